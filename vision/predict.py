"""Predict every task of a multi-task bundle on images; one PNG per task and image.

    python -m vision.predict --adapter runs/vision_demo/multi_polyhistor_lite/adapter --out runs/vision_pred img.jpg ...

Class maps are colour-coded (a fixed palette), saliency / edges as grey probability maps,
normals as RGB ((n + 1) / 2 * 255), depth as a colour map (near = bright).

Maps have the image's resolution, at most --max-side pixels on the long side (default 1024; 0:
full size): a larger photo is reduced while it is decoded (JPEG DCT scaling, box filter), never
held as a full-size float array. 8- and 16-bit pictures (16-bit grey PNG / TIFF, 32-bit I / F)
are scaled by their bit depth. Each map is written atomically as <out>/<stem>_<task>.png; two
inputs with the same stem (a/photo.jpg, b/photo.png) get their parent folder in the name
(a_photo_*, b_photo_*), so no output of a call overwrites another. One line per image, printed as
soon as it is written, maps the image to its files. Unreadable files and folders are named on
stderr as they come, the others predicted, and the exit code is 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.cli import unique_stems
from shared.fs import atomic_path

from .data import DataError, image_tensor
from .images import read_picture

MAX_SIDE = 1024  # long side of the maps written (--max-side); the models see 224-512 px


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


def _pixels(text: str) -> int:
    """argparse type of --max-side: 0 (full size) or a positive number of pixels."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (full size) or a positive number of pixels, got {text}")
    return value


def read_image(path: Path, max_side: int | None = MAX_SIDE) -> np.ndarray:
    """(H, W, 3) in 0..255 (uint8, or float32 for high bit depths), at most `max_side` on the long
    side, reduced while decoding (`vision.images.read_picture`); DataError naming the file."""
    if Path(path).is_dir():
        raise DataError(f"{path}: is a folder, not an image")
    try:
        return read_picture(path, max_side)
    except Exception as e:  # noqa: BLE001 - report any decoder failure with the file name
        raise DataError(f"{path}: cannot read image ({e})") from None


@torch.no_grad()
def predict(model, image_path: Path, max_side: int | None = MAX_SIDE) -> dict[str, np.ndarray]:
    """Each task's map at the image's resolution, at most `max_side` on the long side (logits resized
    bilinearly, then decoded)."""
    img = read_image(image_path, max_side)
    outs = model(image_tensor(img, model.image_size)[None])
    return {t: render(model.tasks[t].kind, F.interpolate(o, size=img.shape[:2], mode="bilinear", align_corners=False)[0])
            for t, o in outs.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vision.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="a bundle folder written by vision.train (<output_dir>/adapter)")
    ap.add_argument("--out", default="runs/vision_predictions",
                    help="folder for <image stem>_<task>.png (the parent folder joins the stem when two inputs "
                         "share one: a_photo_<task>.png, b_photo_<task>.png)")
    ap.add_argument("--max-side", type=_pixels, default=MAX_SIDE, metavar="PX",
                    help=f"long side of the maps in pixels; larger images are reduced while decoded "
                         f"(default {MAX_SIDE}; 0 keeps the full resolution)")
    ap.add_argument("images", nargs="+", help="image files (JPEG / PNG / TIFF / BMP; 8 or 16 bit)")
    a = ap.parse_args(argv)
    from shared.hub import resolve_adapter

    from .train import load_bundle

    try:
        model = load_bundle(resolve_adapter(a.adapter))  # a folder, catalogue name or reference
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = list(map(Path, a.images))
    failed = 0
    for f, stem in zip(files, unique_stems(files)):
        try:
            maps = predict(model, f, a.max_side)
        except DataError as e:
            print(f"skipped: {e}", file=sys.stderr, flush=True)
            failed += 1
            continue
        written = []
        for t, arr in maps.items():
            dest = out / f"{stem}_{t}.png"
            with atomic_path(dest) as tmp:  # a crash never leaves a torn PNG under the final name
                Image.fromarray(arr).save(tmp, format="PNG")
            written.append(str(dest))
        print(f"{f}: " + ", ".join(written), flush=True)
    if failed:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
