"""`python -m medical.segment`: segmentation with a frozen or PEFT-adapted DINOv2 and a linear or UNet decoder.

With no arguments: an offline demo on synthetic image + mask folders (MONAI's shape generator,
lung-mask layout) with a small DINOv2-architecture ViT of RANDOM weights. With recipes:

    python -m medical.segment --config domains/medical/segmentation/lung_unet_lora.yaml --data.root /data/Montgomery
    python -m medical.segment --config domains/medical/segmentation/decathlon_linear.yaml --data.root /data/Task09_Spleen
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from medical import backbone as _register_dinov2  # noqa: F401
from medical.segmentation import SegmentationModule
from medical.train import describe
from shared.cli import arg_value, is_demo, run

DEMO = Path(__file__).resolve().parent.parent / "domains" / "medical" / "segment_demo.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    demo = is_demo(argv)
    if demo:
        from medical.synthetic import write_lung_masks

        root = arg_value(argv, "--data.root", "--data.init_args.root") or \
            yaml.safe_load(DEMO.read_text())["data"]["init_args"]["root"]
        print(f"demo: synthetic images + masks in the lung-mask layout at {root}")
        write_lung_masks(root)
    return run(model_class=SegmentationModule, default_config=DEMO if demo else None, args=argv, describe=describe)


if __name__ == "__main__":
    main()
