"""`python -m medical.predict --adapter <bundle> image.(png|jpg|dcm|nii.gz) [...]`

Classification bundles print class probabilities (2D images, or 3D volumes aggregated over
slices); segmentation bundles write the predicted mask next to `--out` as PNG (2D) or NIfTI (3D).
Only the bundle is needed: it names its backbone, preprocessing and labels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from medical.io import ImageReadError, read_image
from medical.transforms import to_model_input, volume_to_slices
from medical.volumes import classify
from shared import peft


def _inputs(img: np.ndarray, pre: dict, path: str) -> tuple[torch.Tensor, bool]:
    """(model input, is_volume): (1, 3, S, S) for 2D, (1, D, 3, S, S) for 3D.

    NIfTI volumes are sliced along their last (axial) axis; .npy volumes along the axis the
    training data used (`volume_axis` in the bundle's preprocessing).
    """
    size, intensity = pre.get("size", 224), pre.get("intensity", "minmax")
    if isinstance(intensity, list):
        intensity = tuple(intensity)
    if img.ndim == 3 and img.shape[-1] not in (3, 4):
        axis = -1 if ".nii" in Path(path).name else pre.get("volume_axis", 0)
        return volume_to_slices(img, size, intensity, axis=axis)[None], True
    return to_model_input(img, size, intensity)[None], False


def classify_files(bundle: Path, files: list[str], top_k: int = 5) -> list[tuple[str, list[tuple[str, float]]]]:
    model = peft.from_bundle(bundle).eval()
    meta = model.bundle_meta
    pre = meta.get("preprocessing") or {}
    multilabel = bool(meta.get("multilabel"))
    labels = model.labels or [str(i) for i in range(model.head.num_classes)]
    out = []
    for f in files:
        x, is_volume = _inputs(read_image(f), pre, f)
        if not is_volume and "volume_axis" in pre:
            raise ImageReadError(f"{f}: a 2D image, but this bundle classifies 3D volumes (give a .nii.gz / .npy volume)")
        if is_volume and "volume_axis" not in pre:
            raise ImageReadError(f"{f}: a 3D volume, but this bundle classifies 2D images "
                                 f"(give one slice as PNG/DICOM, or use a bundle trained on volumes)")
        with torch.inference_mode():
            logits = classify(model, x, meta.get("slice_pool", "cls"))[0]
        probs = logits.sigmoid() if multilabel else logits.softmax(-1)
        order = probs.argsort(descending=True)[:top_k]
        out.append((f, [(labels[i], probs[i].item()) for i in order.tolist()]))
    return out


def segment_files(bundle: Path, files: list[str], out_dir: Path) -> list[Path]:
    from medical.segmentation import load_segmenter, predict_volume

    backbone, decoder, meta = load_segmenter(bundle)
    pre = meta.get("preprocessing") or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        x, is_volume = _inputs(read_image(f), pre, f)
        slices = x[0] if is_volume else x
        mask = predict_volume(backbone, decoder, slices).numpy().astype(np.uint8)  # (D or 1, S, S)
        stem = Path(f).name.split(".")[0]
        if is_volume:
            import nibabel as nib

            path = out_dir / f"{stem}_mask.nii.gz"
            nib.save(nib.Nifti1Image(np.moveaxis(mask, 0, -1), np.eye(4)), str(path))
        else:
            from PIL import Image

            path = out_dir / f"{stem}_mask.png"
            scale = 255 // max(1, int(mask.max()))  # visible grey levels per class
            Image.fromarray(mask[0] * scale).save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("predictions"), help="folder for predicted masks")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    try:
        meta = peft.read_meta(args.adapter)
        if meta.get("task") == "segmentation":
            for path in segment_files(args.adapter, args.files, args.out):
                print(f"mask written to {path}")
        else:
            for f, top in classify_files(args.adapter, args.files, args.top_k):
                print(f)
                for label, p in top:
                    print(f"  {p:6.3f}  {label}")
    except (peft.BundleError, ImageReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
