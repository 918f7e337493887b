"""DINOv2 backbones (timm) for radiology: hub or local weights, any input size, register tokens.

`create("dinov2", size="s", registers=False, img_size=224, weights=None)` builds timm's
`vit_{small,base,large,giant}_patch14[_reg4]_dinov2.lvd142m`. With `weights=None` and network
access the hub weights are downloaded once; `weights=<file>` loads a local .safetensors / .pth
(timm's own checkpoint filter resizes the positional embedding to `img_size`). `pretrained=False`
gives random weights of the real architecture (tests, offline demos).
"""
from __future__ import annotations

import torch
from torch import nn

from shared.backbones import register_backbone
from shared.heads import Tokens

SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}


def timm_name(size: str = "s", registers: bool = False) -> str:
    if size not in SIZES:
        raise ValueError(f"DINOv2 size must be one of {sorted(SIZES)}, got {size!r}")
    return f"vit_{SIZES[size]}_patch14{'_reg4' if registers else ''}_dinov2.lvd142m"


@register_backbone("dinov2")
def load_dinov2(size: str = "s", registers: bool = False, img_size: int = 224, weights: str | None = None,
                pretrained: bool = True, **kw) -> nn.Module:
    import timm

    name = timm_name(size, registers)
    args = dict(pretrained=pretrained, img_size=img_size, num_classes=0, **kw)
    if weights:
        args.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
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
