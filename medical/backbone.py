"""DINOv2 backbones (timm) for radiology: hub or local weights, any input size, register tokens.

`create("dinov2", size="s", registers=False, img_size=224, weights=None)` builds timm's
`vit_{small,base,large,giant}_patch14[_reg4]_dinov2.lvd142m`. With `weights=None` and network
access the hub weights are downloaded once; `weights=<file>` loads a local .safetensors / .pth
(timm's own checkpoint filter resizes the positional embedding to `img_size`). `pretrained=False`
gives random weights of the real architecture (tests, offline demos); it is registered seeded
(`seed=0` by default), so a bundle trained on it is rebuilt with the same weights by
`shared.peft.from_bundle`. Offline (no network or HF_HUB_OFFLINE=1) with nothing cached, it
fails at once with one line naming the checkpoint and the two ways out.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shared.backbones import register_backbone
from shared.heads import Tokens

SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}


def timm_name(size: str = "s", registers: bool = False) -> str:
    if size not in SIZES:
        raise ValueError(f"DINOv2 size must be one of {sorted(SIZES)}, got {size!r}")
    return f"vit_{SIZES[size]}_patch14{'_reg4' if registers else ''}_dinov2.lvd142m"


def check_weights_available(name: str) -> None:
    """Raise `CheckpointUnavailable` unless timm can get `name`'s pretrained weights now: in the
    Hugging Face cache, or downloadable (hub reachable)."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    from shared.checkpoints import CheckpointUnavailable, hub_reachable

    repo = get_pretrained_cfg(name).hf_hub_id
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
        return
    if not hub_reachable():
        raise CheckpointUnavailable(
            f"DINOv2 checkpoint {repo!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1). Either download it once while online (run the same command, or "
            f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`), or pass a local weights "
            f"file: --model.backbone_kwargs.weights /path/model.safetensors (recipes: backbone_kwargs: {{weights: ...}})")


@register_backbone("dinov2", seeded=True)
def load_dinov2(size: str = "s", registers: bool = False, img_size: int = 224, weights: str | None = None,
                pretrained: bool = True, **kw) -> nn.Module:
    import timm

    name = timm_name(size, registers)
    args = dict(pretrained=pretrained, img_size=img_size, num_classes=0, **kw)
    if weights:
        if not Path(weights).expanduser().is_file():
            from shared.checkpoints import CheckpointUnavailable

            raise CheckpointUnavailable(f"DINOv2 weights file {weights}: not found (backbone_kwargs.weights)")
        args.update(pretrained=True, pretrained_cfg_overlay={"file": str(Path(weights).expanduser())})
    elif pretrained:
        check_weights_available(name)
    model = timm.create_model(name, **args)
    model.pretrained_cfg = {**(model.pretrained_cfg or {}), "hf_hub_id": name}
    return model


def last_blocks_tokens(model: nn.Module, x: torch.Tensor, n: int = 4) -> list[Tokens]:
    """Tokens after the final norm for each of the last `n` blocks of a timm ViT (DINOv2 probes)."""
    outs = model.forward_intermediates(x, indices=n, norm=True, output_fmt="NLC", intermediates_only=True,
                                       return_prefix_tokens=True)
    p = model.patch_embed.patch_size
    grid = (x.shape[-2] // p[0], x.shape[-1] // p[1])
    return [Tokens(torch.cat([pre, patches], dim=1), pre.shape[1], grid) for patches, pre in outs]


def probe_features(model: nn.Module, x: torch.Tensor, n: int = 4) -> dict[str, torch.Tensor]:
    """The linear-probe feature bank of the DINOv2 study, per sample:

    cls_{k}: CLS of each of the last k in {1, n} blocks concatenated (B, k*D);
    patch_mean: average-pooled patch tokens of the last block (B, D).
    """
    toks = last_blocks_tokens(model, x, n)
    cls = [t.x[:, 0] for t in toks]
    return {"cls_1": cls[-1], f"cls_{n}": torch.cat(cls, dim=-1), "patch_mean": toks[-1].patches.mean(1)}
