"""`python -m medical.segment`: segmentation with a frozen or PEFT-adapted DINOv2 and a linear or UNet decoder.

With no arguments: an offline demo on synthetic image + mask folders (MONAI's shape generator,
lung-mask layout) with a small DINOv2-architecture ViT of RANDOM weights. With recipes:

    python -m medical.segment --config domains/medical/segmentation/lung_unet_lora.yaml --data.root /data/Montgomery
    python -m medical.segment --config domains/medical/segmentation/decathlon_linear.yaml --data.root /data/Task09_Spleen
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from medical.segmentation import SegmentationModule
from medical.train import describe
from shared.cli import domain_main, friendly

DEMO = Path(__file__).resolve().parent.parent / "domains" / "medical" / "segment_demo.yaml"


def volume_level(model, data) -> dict:
    """Dice / HD95 on whole test volumes (Decathlon-style data), scored at each label's native
    resolution with the file's voxel spacing (`medical.segmentation.score_volume`)."""
    if not hasattr(data, "volumes"):
        return {}
    from medical.segmentation import score_volume

    scores = [score_volume(model.model.backbone, model.model.decoder, data, img, lbl)
              for img, lbl in data.volumes("test")]
    if not scores:
        return {}
    mean = lambda k: float(torch.tensor([s[k] for s in scores]).nanmean())  # noqa: E731
    units = sorted({s["hd95_unit"] for s in scores})
    unit = units[0] if len(units) == 1 else "mixed: " + "/".join(units)
    print(f"volume-level test metrics over {len(scores)} volumes (native resolution): dice {mean('dice'):.4f}, "
          f"hd95 {mean('hd95'):.2f} {unit}")
    if hasattr(model, "metric_units"):
        model.metric_units = {**model.metric_units, "test/volume_hd95": unit}
    return {"test/volume_dice": mean("dice"), "test/volume_hd95": mean("hd95"), "test/volumes": len(scores)}


def main(argv: list[str] | None = None) -> dict:
    from medical.synthetic import write_lung_masks

    return domain_main(argv, DEMO, write_lung_masks, "synthetic images + masks in the lung-mask layout",
                       model_class=SegmentationModule, describe=describe, evaluate=volume_level)


if __name__ == "__main__":
    sys.exit(friendly(main))
