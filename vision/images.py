"""Decoding pictures for the vision path: any bit depth to 0..255 RGB, reduced while decoding.

- `rgb_array(im)`: a PIL image as (H, W, 3): uint8 for 8-bit modes (L, RGB, P, RGBA, CMYK, ...),
  float32 in [0, 255] for the high-bit-depth modes, scaled by their bit depth, not clipped:
  16-bit (I;16*, e.g. 16-bit grey PNG / TIFF, value / 65535), 32-bit integer I (0..255 kept as is,
  0..65535 as 16-bit, other ranges min-max) and 32-bit float F ([0, 1] as the full range, 0..255
  kept as is, other ranges min-max). Converting those with PIL's `convert("RGB")` clips every value
  above 255, so a 16-bit picture turns all white.
- `read_picture(path, max_side)`: the picture at most `max_side` pixels on its long side (aspect
  kept), reduced BEFORE it becomes an array: a JPEG is decoded at 1/2, 1/4 or 1/8 scale by its
  DCT (`draft`), other formats are shrunk by an integer box filter (`reduce`), then one
  antialiased resize gives the exact size; the EXIF orientation of camera photos is applied. A
  6000 x 4000 photo never exists as a full-size float array.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
HIGH_DEPTH = SIXTEEN_BIT | {"I", "F"}


def fit(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(w, h) scaled so that its long side is at most `max_side` (0 / None: unchanged), aspect kept."""
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _scale(mode: str, lo: float, hi: float) -> tuple[float, float]:
    """(offset, factor) mapping a high-depth mode's values to 0..255: (x - offset) * factor."""
    if mode in SIXTEEN_BIT:
        return 0.0, 255.0 / 65535.0
    if mode == "F" and 0.0 <= lo and hi <= 1.0:
        return 0.0, 255.0
    if 0 <= lo and hi <= 255:
        return 0.0, 1.0
    if mode == "I" and 0 <= lo and hi <= 65535:
        return 0.0, 255.0 / 65535.0
    return lo, (255.0 / (hi - lo) if hi > lo else 0.0)


def rgb_array(im: Image.Image, mode: str | None = None, extrema: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W, 3): uint8 for 8-bit modes, float32 in [0, 255] for high-depth ones (see the module
    docstring). `mode` / `extrema`: the picture's mode and value range as decoded, when `im` is a
    reduced copy of it (converted to F); else `im`'s own."""
    mode = mode or im.mode
    if mode not in HIGH_DEPTH:
        return np.asarray(im.convert("RGB"))
    lo, hi = extrema if extrema is not None else im.getextrema()
    offset, factor = _scale(mode, float(lo), float(hi))
    grey = np.asarray(im if im.mode == "F" else im.convert("F"), dtype=np.float32)
    grey = np.clip((grey - offset) * factor, 0.0, 255.0)
    return np.repeat(grey[..., None], 3, axis=-1)


def read_picture(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """The picture at `path` as `rgb_array` gives it, at most `max_side` on its long side (0 / None:
    full size). Decoder errors propagate (the caller names the file)."""
    with Image.open(path) as im:
        target = fit(im.size, max_side)
        if im.format == "JPEG" and target != im.size:
            im.draft(None, target)  # decode at the smallest DCT scale still >= target
        im.load()
        mode = im.mode
        extrema = im.getextrema() if mode in HIGH_DEPTH else None
        if mode in HIGH_DEPTH:
            im = im.convert("F")  # exact for 16-bit; reduce / resize work on it
        factor = min(im.width // target[0], im.height // target[1])
        if factor >= 2:
            im = im.reduce(factor)  # box filter: every source pixel counts once
        im = ImageOps.exif_transpose(im)
        want = fit(im.size, max_side)
        if im.size != want:
            im = im.resize(want, Image.BILINEAR)  # antialiased when shrinking
        return rgb_array(im, mode, extrema)
