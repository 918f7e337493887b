"""`python -m medical.train`: DINOv2 for radiology — PEFT / fine-tuning classification (2D and 3D).

With no arguments: an offline demo on a small synthetic dataset in the image-folder layout
(MONAI's shape generator), with a small DINOv2-architecture ViT of RANDOM weights and LoRA on
qkv / fc1 / fc2. With recipes:

    python -m medical.train --config domains/medical/data/medmnist.yaml --config domains/medical/methods/lora.yaml \
        --data.root /data/medmnist/pneumoniamnist.npz
Frozen-backbone regimes (kNN, linear-probe grid): `python -m medical.probe`; segmentation:
`python -m medical.segment`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from medical.volumes import classify
from shared.cli import domain_main, friendly
from shared.module import ClassificationModule

RECIPES = Path(__file__).resolve().parent.parent / "domains" / "medical"
DEMO = RECIPES / "demo.yaml"


class MedicalClassificationModule(ClassificationModule):
    """The generic module, plus 3D volumes: slice features aggregated by the head.

    Args (beyond ClassificationModule): slice_pool: how each slice's tokens are pooled
    before the head aggregates slices ("cls" as the study; the head's own pool then averages
    slices, or an attentive head attends over them).
    """

    def __init__(self, *args, slice_pool: str = "cls", **kwargs):
        super().__init__(*args, **kwargs)
        self.slice_pool = slice_pool

    def forward(self, inputs):
        return classify(self.model, inputs, self.slice_pool)

    def bundle_extra(self):
        return {**super().bundle_extra(), "slice_pool": self.slice_pool}

    def loss(self, logits, y):
        if self.multilabel and y.is_floating_point() and y.isnan().any():
            from medical.data import masked_bce  # CheXpert "ignore" policy: NaN targets are masked

            return masked_bce(logits, y)
        return super().loss(logits, y)


def describe(model, data) -> None:
    data_ml = getattr(data, "multilabel", None)
    if data_ml is not None and "multilabel" in model.hparams and bool(data_ml) != bool(model.hparams.multilabel):
        raise ValueError(f"the data is {'multi' if data_ml else 'single'}-label: set --model.multilabel {bool(data_ml)}")
    bb, kw = model.hparams.backbone, model.hparams.backbone_kwargs or {}
    if bb.startswith("tiny-") or kw.get("pretrained") is False:
        print(f"backbone: {bb} {kw} with RANDOM weights (demo / tests; no pretrained knowledge)")
    else:
        print(f"backbone: {bb} {kw}")


def main(argv: list[str] | None = None) -> dict:
    from medical.synthetic import write_image_folder

    return domain_main(argv, DEMO, write_image_folder, "synthetic radiology-like images (MONAI shapes, image-folder layout)",
                       model_class=MedicalClassificationModule, describe=describe)


if __name__ == "__main__":
    sys.exit(friendly(main))
