"""Small deterministic radiology-like datasets in real layouts, made with MONAI's generators.

- `write_image_folder`: `root/{train,val,test}/<class>/*.png`, classes differ by the size of
  the bright blobs MONAI's `create_test_image_2d` draws (a stand-in for lesion size);
- `write_lung_masks`: `root/images/*.png` + `root/masks/*.png` (0/255), Montgomery/Shenzhen style.
Both write each file atomically and reuse a complete existing copy.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from monai.data.synthetic import create_test_image_2d
from PIL import Image

from shared.cli import mark_demo_folder
from shared.fs import atomic_path

CLASSES = {"small_lesions": (2, 4), "large_lesions": (7, 10), "no_lesion": None}


def _save_png(arr: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _to_uint8(img: np.ndarray) -> np.ndarray:
    img = (img - img.min()) / (img.max() - img.min() + 1e-8)
    return (255 * img).astype(np.uint8)


def _image(rng: np.random.Generator, size: int, radii) -> tuple[np.ndarray, np.ndarray]:
    seed = int(rng.integers(0, 2**31 - 1))
    if radii is None:  # background texture only
        img, seg = create_test_image_2d(size, size, num_objs=1, rad_min=1, rad_max=2, noise_max=0.6,
                                        random_state=np.random.RandomState(seed))
        return img * 0.2 + 0.2 * np.random.RandomState(seed).rand(size, size), np.zeros_like(seg)
    img, seg = create_test_image_2d(size, size, num_objs=int(rng.integers(2, 5)), rad_min=radii[0],
                                    rad_max=radii[1], noise_max=0.4, random_state=np.random.RandomState(seed))
    return img, seg


def write_image_folder(root: str | os.PathLike, per_class: dict[str, int] | None = None, size: int = 64,
                       seed: int = 0) -> Path:
    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    mark_demo_folder(root, "synthetic radiology-like images (image-folder layout)")
    per_class = per_class or {"train": 24, "val": 8, "test": 8}
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name, radii in CLASSES.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, _ = _image(rng, size, radii)
                _save_png(_to_uint8(img), d / f"{name}_{split}_{i:03d}.png")
    done.touch()
    return root


def write_lung_masks(root: str | os.PathLike, n: int = 30, size: int = 64, seed: int = 0) -> Path:
    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    mark_demo_folder(root, "synthetic images + masks (lung-mask layout)")
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, seg = _image(rng, size, (6, 12))
        _save_png(_to_uint8(img), root / "images" / f"case_{i:03d}.png")
        _save_png(((seg > 0) * 255).astype(np.uint8), root / "masks" / f"case_{i:03d}.png")
    done.touch()
    return root
