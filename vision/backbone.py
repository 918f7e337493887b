"""The Swin-T backbone (timm `swin_tiny_patch4_window7_224`), registered as `swin-t`."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from shared.backbones import register_backbone

TIMM_NAME = "swin_tiny_patch4_window7_224"


@register_backbone("swin-t", seeded=True)
def load_swin_t(img_size: int = 224, weights: str | None = None, pretrained: bool = True, **kw) -> nn.Module:
    """ImageNet-1k Swin-T (downloaded once by timm), a local weights file, or random weights."""
    import timm

    args = dict(pretrained=pretrained, img_size=img_size, num_classes=0, **kw)
    if weights:
        if not Path(weights).expanduser().is_file():
            from shared.checkpoints import CheckpointUnavailable

            raise CheckpointUnavailable(f"Swin-T weights file {weights}: not found (backbone_kwargs.weights)")
        args.update(pretrained=True, pretrained_cfg_overlay={"file": str(Path(weights).expanduser())})
    elif pretrained:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        from shared.checkpoints import CheckpointUnavailable, hub_reachable

        repo = get_pretrained_cfg(TIMM_NAME).hf_hub_id
        cached = any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin"))
        if not cached and not hub_reachable():
            raise CheckpointUnavailable(
                f"Swin-T checkpoint {repo!r} is not in the local Hugging Face cache and the hub cannot be reached. "
                "Download it once while online, or pass --model.backbone_kwargs.weights /path/model.safetensors, "
                "or --model.backbone_kwargs.pretrained false for random weights")
    return timm.create_model(TIMM_NAME, **args)


def stage_dims(backbone: nn.Module) -> list[int]:
    """Channels of each stage's output (C, 2C, 4C, 8C for Swin)."""
    return [int(f["num_chs"]) for f in backbone.feature_info]
