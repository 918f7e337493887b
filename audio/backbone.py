"""AST backbone loading with the positional embedding resized along time.

The PETL-AST code loads `from_pretrained(max_length=L, ignore_mismatched_sizes=True)`, which
re-initialises the positional embedding at random whenever L differs from the checkpoint's
1024 frames. We load the checkpoint at its own size and interpolate the time axis of its
positional grid to the recipe's frame count (`checkpoint_filter_fn`), keeping the frequency
axis and the CLS / distillation positions as trained.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.backbones import register_backbone

DEFAULT_CHECKPOINT = "MIT/ast-finetuned-audioset-10-10-0.4593"
POS_KEY = "embeddings.position_embeddings"


def _grid(cfg) -> tuple[int, int]:
    f = (cfg.num_mel_bins - cfg.patch_size) // cfg.frequency_stride + 1
    t = (cfg.max_length - cfg.patch_size) // cfg.time_stride + 1
    return f, t


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     num_prefix: int = 2) -> torch.Tensor:
    """(1, P + F*T, D) -> (1, P + F'*T', D): prefix positions kept, the patch grid resized bilinearly."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    d = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, d).permute(0, 3, 1, 2)  # (1, D, F, T)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module,
                         source_config) -> dict[str, torch.Tensor]:
    """Map an AST state dict (trained with `source_config`) onto `model`: resize the positional
    embedding's time axis to the model's frame count. Frequency layouts must agree."""
    for field in ("num_mel_bins", "frequency_stride", "patch_size", "time_stride", "hidden_size"):
        if getattr(source_config, field) != getattr(model.config, field):
            raise ValueError(f"AST checkpoint has {field}={getattr(source_config, field)} but the requested model "
                             f"has {getattr(model.config, field)}; only max_length (frames) can differ")
    out = dict(state_dict)
    key = next((k for k in out if k.endswith(POS_KEY)), None)
    if key is None:
        raise KeyError(f"checkpoint has no {POS_KEY}")
    out[key] = resize_pos_embed(out[key], _grid(source_config), _grid(model.config))
    return out


@register_backbone("ast")
def load_ast(checkpoint: str = DEFAULT_CHECKPOINT, max_length: int | None = None, **config_overrides) -> nn.Module:
    """An `ASTModel` from a hub id or local folder, with `max_length` frames (pos-embed resized).

    Downloads the weights once when online; afterwards (or with HF_HUB_OFFLINE=1) it loads from
    the local cache. `checkpoint` may also be a folder written by `save_pretrained`.
    """
    from transformers import ASTConfig, ASTModel

    src = ASTModel.from_pretrained(checkpoint)
    if (max_length is None or max_length == src.config.max_length) and not config_overrides:
        return src
    cfg = ASTConfig.from_dict({**src.config.to_dict(), "max_length": max_length or src.config.max_length,
                               **config_overrides})
    model = ASTModel(cfg)
    model.load_state_dict(checkpoint_filter_fn(src.state_dict(), model, src.config))
    model.config.name_or_path = checkpoint
    return model
