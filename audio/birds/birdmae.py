"""Bird-MAE (Rauch et al. 2025) in our own definition: a timm `VisionTransformer` with one input
channel reading a (512 frames x 128 mel) fbank, Base / Large / Huge.

The hub checkpoints `DBD-research-group/Bird-MAE-{Base,Large,Huge}` ship custom modelling code;
we never run it (no `trust_remote_code`). Their `model.safetensors` holds a plain MAE encoder:

    patch_embed.proj.weight (D, 1, 16, 16), patch_embed.proj.bias (D,)
    cls_token (1, 1, D), pos_embed (1, 257, D)      # fixed sin-cos, 1 + 32 x 8 positions
    blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2 .{weight,bias}
    norm.{weight,bias}, fc_norm.{weight,bias}

Orientation: the encoder convolves a (B, 1, 512, 128) input, time first, so the patch grid is
(32 time x 8 frequency) and token 1 + t * 8 + f is time patch t, mel patch f. We keep that layout
(it is what the weights were trained with); `Tokens.grid` is (32, 8) = (time, frequency).

`checkpoint_filter_fn(state_dict, model)` maps such a state dict (or the research code's Lightning
checkpoints with `encoder.` / `model.` prefixes and decoder weights) onto the model:
- `fc_norm.*` is dropped: the hub code applies it to the MEAN of the un-normalised patch tokens
  (its pooled output). Our heads read the final-norm tokens (`norm`), as Bird-MAE's prototypical
  probe does, and timm cannot hold both a final norm and an fc_norm, so it has no place here.
- decoder / mask-token / head keys are dropped; the positional embedding is resized (bilinear on
  its time axis) when the model was built for another frame count.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared.backbones import register_backbone
from shared.checkpoints import CheckpointUnavailable, hub_reachable

PATCH = 16
FRAMES, MELS = 512, 128  # 5.12 s at 10 ms hop x 128 mel bins
SIZES = {  # embed_dim, depth, num_heads (the hub configs)
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
HUB_IDS = {"base": "DBD-research-group/Bird-MAE-Base", "large": "DBD-research-group/Bird-MAE-Large",
           "huge": "DBD-research-group/Bird-MAE-Huge"}
DROP_PREFIXES = ("decoder", "mask_token", "head.", "fc_norm.", "projectors.", "predictors.")


def build(embed_dim: int, depth: int, num_heads: int, frames: int = FRAMES, mels: int = MELS,
          patch_size: int = PATCH, drop_path_rate: float = 0.0) -> nn.Module:
    """The Bird-MAE encoder architecture with random weights: (B, 1, frames, mels) -> tokens."""
    import timm

    return timm.models.vision_transformer.VisionTransformer(
        img_size=(frames, mels), patch_size=patch_size, in_chans=1, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token",
        fc_norm=False, num_classes=0, drop_path_rate=drop_path_rate,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))


def _grid(n_patches: int, model: nn.Module) -> tuple[int, int]:
    g_time, g_mel = model.patch_embed.grid_size
    if n_patches % g_mel:
        raise ValueError(f"checkpoint pos_embed has {n_patches} patch positions, not a multiple of the "
                         f"model's {g_mel} mel patches")
    return n_patches // g_mel, g_mel


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a Bird-MAE encoder state dict (hub `model.safetensors` or research checkpoint) onto `model`.

    Pure: returns a new dict; raises ValueError naming the first key whose shape cannot fit."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ("model.", "encoder.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(DROP_PREFIXES):
            continue
        out[key] = value
    target = model.state_dict()
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != target["pos_embed"].shape:
        n_prefix = 1
        old = _grid(pos.shape[1] - n_prefix, model)
        new = tuple(model.patch_embed.grid_size)
        grid = pos[:, n_prefix:].reshape(1, *old, -1).permute(0, 3, 1, 2)  # (1, D, T, F)
        grid = F.interpolate(grid.float(), size=new, mode="bilinear", align_corners=False)
        out["pos_embed"] = torch.cat([pos[:, :n_prefix], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
                                      .to(pos.dtype)], 1)
    for key, value in out.items():
        if key in target and tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(f"Bird-MAE checkpoint key {key!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(target[key].shape)} (wrong size? base / large / huge)")
    return out


def _load_state(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A local .safetensors file / folder holding model.safetensors, or a hub id (downloaded once)."""
    from safetensors.torch import load_file

    p = Path(checkpoint).expanduser()
    if p.is_dir():
        p = p / "model.safetensors"
    if p.suffix == ".safetensors" or p.exists():
        if not p.is_file():
            raise CheckpointUnavailable(f"Bird-MAE checkpoint {p}: file not found")
        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise CheckpointUnavailable(f"Bird-MAE checkpoint {p}: not a readable safetensors file ({e})") from None
    from huggingface_hub import hf_hub_download

    try:
        return load_file(hf_hub_download(str(checkpoint), "model.safetensors", local_files_only=True))
    except Exception:
        pass
    if not hub_reachable():
        raise CheckpointUnavailable(
            f"Bird-MAE checkpoint {checkpoint!r} is not in the local Hugging Face cache and the hub cannot be "
            f"reached (offline or HF_HUB_OFFLINE=1): download it once online, or pass a local model.safetensors "
            f"with --backbone_kwargs.checkpoint /path/to/model.safetensors")
    return load_file(hf_hub_download(str(checkpoint), "model.safetensors"))


@register_backbone("bird-mae")
def bird_mae(size: str = "base", checkpoint: str | None = None, frames: int = FRAMES,
             pretrained: bool = True, drop_path_rate: float = 0.0) -> nn.Module:
    """Bird-MAE Base / Large / Huge. `checkpoint`: hub id (default: the size's DBD-research-group
    repo) or a local model.safetensors / folder. `pretrained=False`: the architecture only."""
    if size not in SIZES:
        raise ValueError(f"Bird-MAE size must be one of {sorted(SIZES)}, got {size!r}")
    state = _load_state(checkpoint or HUB_IDS[size]) if pretrained else None  # fail fast, before building
    model = build(*SIZES[size], frames=frames, drop_path_rate=drop_path_rate)
    if state is not None:
        model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    return model


@register_backbone("tiny-bird-mae", seeded=True)
def tiny_bird_mae(embed_dim: int = 32, depth: int = 2, num_heads: int = 4, frames: int = FRAMES,
                  mels: int = MELS) -> nn.Module:
    """The Bird-MAE architecture (1 channel, 512 x 128, 16 x 16 patches), small and random: tests / demo."""
    return build(embed_dim, depth, num_heads, frames=frames, mels=mels)


def hub_state_dict_shapes(embed_dim: int, depth: int, grid: tuple[int, int] = (FRAMES // PATCH, MELS // PATCH),
                          mlp_ratio: float = 4.0) -> dict[str, tuple[int, ...]]:
    """The key names and shapes of a hub Bird-MAE `model.safetensors` for a given width / depth."""
    d, h = embed_dim, int(embed_dim * mlp_ratio)
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid[0] * grid[1], d),
              "patch_embed.proj.weight": (d, 1, PATCH, PATCH), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,), "fc_norm.weight": (d,), "fc_norm.bias": (d,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (h, d),
                       b + "mlp.fc1.bias": (h,), b + "mlp.fc2.weight": (d, h), b + "mlp.fc2.bias": (d,)})
    return shapes
