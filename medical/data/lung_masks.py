"""Lung segmentation on chest X-rays (Montgomery, Shenzhen): images and masks matched by stem."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shared.data import split_by_group

from ..io import check_same_shape, read_image, read_mask
from ..transforms import finish, scale_intensity
from .base import SPLITS, DatasetLayoutError, MedicalDataModule, Split, image_files

log = logging.getLogger(__name__)


class LungMaskDataModule(MedicalDataModule):
    """Lung segmentation on chest X-rays (Montgomery, Shenzhen): images and masks matched by stem.

    Layouts: `root/images/*` or `root/CXR_png/*`, with masks in `root/masks/` or `root/mask/`
    named `<stem>.<ext>` or `<stem>_mask.<ext>` (the Shenzhen release), or Montgomery's official
    `root/ManualMask/leftMask/<stem>.png` + `rightMask/<stem>.png` (united). Masks are binary:
    0/255 (or 0/1) -> {0, 1} (values > 127, or > 0 for 0/1 masks, are lung). Labels
    ["background", "lung"]. Split 70 / 15 / 15 by image, seeded. An image without a mask raises
    DatasetLayoutError naming the image (``missing_masks="skip"`` drops it instead, e.g. for the
    Shenzhen images that have no released mask).
    """

    name = "lungmask"
    default_imaging = {"modality": "CR/DX", "body_part": "CHEST"}
    task = "segmentation"
    protocol = "70/15/15 split by image"

    def __init__(self, root: str, missing_masks: str = "error", **kw):
        if missing_masks not in ("error", "skip"):
            raise ValueError(f"missing_masks must be 'error' or 'skip', got {missing_masks!r}")
        self.missing_masks = missing_masks
        super().__init__(root, **kw)

    def _first_dir(self, names: Sequence[str]) -> Path | None:
        return next((self.root / n for n in names if (self.root / n).is_dir()), None)

    @staticmethod
    def _by_stem(folder: Path) -> dict[str, Path]:
        out = {}
        for p in image_files(folder):
            stem = p.name[: -len(".nii.gz")] if p.name.lower().endswith(".nii.gz") else p.stem
            out[stem] = p
            if stem.endswith("_mask"):
                out.setdefault(stem[: -len("_mask")], p)
        return out

    def read_splits(self) -> dict[str, Split]:
        img_dir = self._first_dir(("images", "CXR_png"))
        if img_dir is None:
            raise DatasetLayoutError(f"{self.root}: no images/ (or CXR_png/) folder")
        mask_dir = self._first_dir(("masks", "mask"))
        left, right = self.root / "ManualMask" / "leftMask", self.root / "ManualMask" / "rightMask"
        if mask_dir is not None:
            sources = [self._by_stem(mask_dir)]
            where = str(mask_dir)
        elif left.is_dir() and right.is_dir():
            sources = [self._by_stem(left), self._by_stem(right)]
            where = f"{left} and {right}"
        else:
            raise DatasetLayoutError(f"{self.root}: no masks/ (or mask/, ManualMask/leftMask+rightMask) folder")
        images = self._by_stem(img_dir)
        if not images:
            raise DatasetLayoutError(f"{img_dir}: no images")
        items = []
        for stem, p in sorted(images.items()):
            if stem.endswith("_mask") and stem[: -len("_mask")] in images:
                continue
            masks = [s.get(stem) for s in sources]
            if any(m is None for m in masks):
                if self.missing_masks == "skip":
                    log.warning("skipping %s: no mask in %s", p, where)
                    continue
                raise DatasetLayoutError(f"{p}: no mask for image {stem!r} in {where} "
                                         f"(expected {stem}.<ext> or {stem}_mask.<ext>)")
            items.append((p, tuple(masks)))
        if not items:
            raise DatasetLayoutError(f"{self.root}: no image has a mask")
        self.labels = ["background", "lung"]
        try:
            parts = split_by_group(np.arange(len(items)), (0.7, 0.15, 0.15), seed=self.seed)
        except ValueError as err:
            raise DatasetLayoutError(f"{self.root}: {len(items)} image/mask pairs are too few to split ({err})")
        everything = Split(items)
        return {s: everything.subset(p) for s, p in zip(SPLITS, parts)}

    def read_pair(self, item) -> tuple[np.ndarray, np.ndarray]:
        """(image, binary mask) at full resolution; shapes checked (ImageReadError names both files)."""
        img_path, mask_paths = item
        img = read_image(img_path)
        mask = np.zeros(img.shape[:2], dtype=np.int64)
        for mp in mask_paths:
            m = read_mask(mp)
            if m.ndim == 3 and m.shape[-1] == 1:
                m = m[..., 0]
            check_same_shape(img, m, img_path, mp)
            mask |= (m > 127) if m.max() > 1 else (m > 0)
        return img, mask

    def load(self, item, augment=None):
        img, mask = self.read_pair(item)
        chw = torch.as_tensor(img)[None] if img.ndim == 2 else torch.as_tensor(img).permute(2, 0, 1)
        return finish(scale_intensity(chw, self.intensity), self.img_size, augment, mask=torch.from_numpy(mask))
