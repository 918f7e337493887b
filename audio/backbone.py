"""AST backbone loading with the positional embedding resized along time.

The PETL-AST code loads `from_pretrained(max_length=L, ignore_mismatched_sizes=True)`, which
re-initialises the positional embedding at random whenever L differs from the checkpoint's
1024 frames. We load the checkpoint at its own size and resize the time axis of its positional
grid to the recipe's frame count (`checkpoint_filter_fn`) the way the original AST code does:
centre crop when there are fewer frames, bilinear interpolation when there are more
(`pos_resize="interpolate"` interpolates either way); the frequency axis and the CLS /
distillation positions stay as trained.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.backbones import register_backbone
from shared.checkpoints import CheckpointUnavailable, hub_reachable

DEFAULT_CHECKPOINT = "MIT/ast-finetuned-audioset-10-10-0.4593"
POS_KEY = "embeddings.position_embeddings"


def _grid(cfg) -> tuple[int, int]:
    f = (cfg.num_mel_bins - cfg.patch_size) // cfg.frequency_stride + 1
    t = (cfg.max_length - cfg.patch_size) // cfg.time_stride + 1
    return f, t


POS_RESIZE = ("crop", "interpolate")


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     num_prefix: int = 2, mode: str = "crop") -> torch.Tensor:
    """(1, P + F*T, D) -> (1, P + F'*T', D): prefix positions kept, the patch grid resized.

    mode "crop" (the original AST code's rule, per axis): an axis that gets shorter keeps its
    centre positions old//2 - new//2 ... old//2 - new//2 + new - 1 (AudioSet's 101 time
    positions -> 49 keeps 26..74, still 10 ms apart); an axis that gets longer is interpolated
    bilinearly. mode "interpolate": both axes resized bilinearly (shorter inputs then squeeze the
    pretrained positions closer together).
    """
    if mode not in POS_RESIZE:
        raise ValueError(f"pos_resize must be one of {POS_RESIZE}, got {mode!r}")
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    d = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, d).permute(0, 3, 1, 2)  # (1, D, F, T)
    if mode == "crop":
        (f0, t0), (f1, t1) = old_grid, new_grid
        if f1 < f0:
            grid = grid[:, :, f0 // 2 - f1 // 2: f0 // 2 - f1 // 2 + f1]
        if t1 < t0:
            grid = grid[:, :, :, t0 // 2 - t1 // 2: t0 // 2 - t1 // 2 + t1]
    if tuple(grid.shape[-2:]) != tuple(new_grid):  # an axis still to grow (or mode "interpolate")
        grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module,
                         source_config, pos_resize: str = "crop") -> dict[str, torch.Tensor]:
    """Map an AST state dict (trained with `source_config`) onto `model`: resize the positional
    embedding's time axis to the model's frame count (`resize_pos_embed`, mode `pos_resize`).
    Frequency layouts must agree."""
    for field in ("num_mel_bins", "frequency_stride", "patch_size", "time_stride", "hidden_size"):
        if getattr(source_config, field) != getattr(model.config, field):
            raise ValueError(f"AST checkpoint has {field}={getattr(source_config, field)} but the requested model "
                             f"has {getattr(model.config, field)}; only max_length (frames) can differ")
    out = dict(state_dict)
    key = next((k for k in out if k.endswith(POS_KEY)), None)
    if key is None:
        raise KeyError(f"checkpoint has no {POS_KEY}")
    out[key] = resize_pos_embed(out[key], _grid(source_config), _grid(model.config), mode=pos_resize)
    return out


def _from_pretrained(cls, checkpoint: str):
    """`cls.from_pretrained(checkpoint)` from a local folder or the Hugging Face cache; downloads only when
    the hub is reachable, else fails at once (no retries) saying how to get the weights."""
    from pathlib import Path

    if Path(checkpoint).is_dir():
        try:
            return cls.from_pretrained(checkpoint)
        except (OSError, ValueError) as e:
            raise CheckpointUnavailable(f"AST checkpoint folder {checkpoint}: not a folder written by save_pretrained "
                                        f"({str(e).splitlines()[0]})") from None
    if str(checkpoint).startswith(("/", "./", "../", "~")):  # a path, not a hub id
        raise CheckpointUnavailable(f"AST checkpoint folder {checkpoint}: not found "
                                    f"(--model.backbone_kwargs.checkpoint takes a save_pretrained folder or a hub id)")
    try:
        return cls.from_pretrained(checkpoint, local_files_only=True)
    except OSError:
        pass
    if not hub_reachable():
        raise CheckpointUnavailable(
            f"AST checkpoint {checkpoint!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1). Either download it once while online (run the same command, or "
            f"`python -c \"from transformers import ASTModel; ASTModel.from_pretrained('{checkpoint}')\"`), or pass "
            f"a folder written by save_pretrained: --model.backbone_kwargs.checkpoint /path/to/ast")
    return cls.from_pretrained(checkpoint)


@register_backbone("ast")
def load_ast(checkpoint: str = DEFAULT_CHECKPOINT, max_length: int | None = None, pos_resize: str = "crop",
             **config_overrides) -> nn.Module:
    """An `ASTModel` from a hub id or local folder, with `max_length` frames (pos-embed resized:
    `pos_resize` "crop" = the original AST code's centre crop for fewer frames, interpolation for
    more; "interpolate" = bilinear either way; see `resize_pos_embed`).

    Downloads the weights once when online; afterwards (or with HF_HUB_OFFLINE=1) it loads from
    the local cache. `checkpoint` may also be a folder written by `save_pretrained`. Offline with
    nothing cached it raises `CheckpointUnavailable` at once, naming the checkpoint.
    """
    if pos_resize not in POS_RESIZE:  # before any download, even when nothing needs resizing
        raise ValueError(f"pos_resize must be one of {POS_RESIZE}, got {pos_resize!r}")
    from transformers import ASTConfig, ASTModel

    src = _from_pretrained(ASTModel, checkpoint)
    if (max_length is None or max_length == src.config.max_length) and not config_overrides:
        return src
    cfg = ASTConfig.from_dict({**src.config.to_dict(), "max_length": max_length or src.config.max_length,
                               **config_overrides})
    model = ASTModel(cfg)
    model.load_state_dict(checkpoint_filter_fn(src.state_dict(), model, src.config, pos_resize=pos_resize))
    model.config.name_or_path = checkpoint
    return model
