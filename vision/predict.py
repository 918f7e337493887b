"""Predict every task of a multi-task bundle on images; one PNG per task and image.

    python -m vision.predict --adapter runs/vision_demo/multi_polyhistor_lite/adapter --out runs/vision_pred img.jpg ...

Class maps are colour-coded (a fixed palette), saliency / edges as grey probability maps,
normals as RGB ((n + 1) / 2 * 255), depth as a colour map (near = bright). Unreadable files and
folders are named on stderr, the others predicted, and the exit code is 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import DataError, image_tensor, read_image


def palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), n x 3 uint8."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def render(kind: str, out: torch.Tensor) -> np.ndarray:
    """(C, H, W) decoder output -> (H, W[, 3]) uint8 picture."""
    if kind == "classes":
        return palette(out.shape[0])[out.argmax(0).numpy()]
    if kind == "binary":
        return (out[0].sigmoid().numpy() * 255).round().astype(np.uint8)
    if kind == "normals":
        n = F.normalize(out, dim=0).permute(1, 2, 0).numpy()
        return ((n + 1) / 2 * 255).round().clip(0, 255).astype(np.uint8)
    import matplotlib

    d = out[0].numpy()
    lo, hi = float(d.min()), float(d.max())
    z = 1 - (d - lo) / (hi - lo if hi > lo else 1)  # near = 1
    return (matplotlib.colormaps["magma"](z)[..., :3] * 255).round().astype(np.uint8)


@torch.no_grad()
def predict(model, image_path: Path) -> dict[str, np.ndarray]:
    """Each task's map at the image's own resolution (logits resized bilinearly, then decoded)."""
    img = read_image(image_path)
    outs = model(image_tensor(img, model.image_size)[None])
    return {t: render(model.tasks[t].kind, F.interpolate(o, size=img.shape[:2], mode="bilinear", align_corners=False)[0])
            for t, o in outs.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vision.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="a bundle folder written by vision.train (<output_dir>/adapter)")
    ap.add_argument("--out", default="runs/vision_predictions", help="folder for <image stem>_<task>.png")
    ap.add_argument("images", nargs="+", help="image files (JPEG / PNG)")
    a = ap.parse_args(argv)
    from .train import load_bundle

    try:
        model = load_bundle(a.adapter)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for f in map(Path, a.images):
        try:
            if f.is_dir():
                raise DataError(f"{f}: is a folder, not an image")
            maps = predict(model, f)
        except DataError as e:
            print(f"skipped: {e}", file=sys.stderr)
            failed += 1
            continue
        for t, arr in maps.items():
            Image.fromarray(arr).save(out / f"{f.stem}_{t}.png")
        print(f"{f}: " + ", ".join(f"{out / f'{f.stem}_{t}.png'}" for t in maps))
    if failed:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
