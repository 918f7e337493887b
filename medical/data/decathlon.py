"""Medical Segmentation Decathlon task folders: 3D volumes sliced for a 2D backbone, split by volume."""
from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from shared.data import few_shot_indices, split_by_group

from ..io import ImageReadError, check_same_shape, read_image, read_mask
from ..transforms import finish, mask_to_size, scale_intensity, volume_to_slices
from .base import SPLITS, DatasetLayoutError, MedicalDataModule, Split

log = logging.getLogger(__name__)


class _VolumeCache:
    """A small LRU of decoded volumes; never pickled (each loader worker starts empty)."""

    def __init__(self, size: int):
        self.size, self.data = max(1, size), OrderedDict()

    def get(self, key, make):
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        value = self.data[key] = make()
        while len(self.data) > self.size:
            self.data.popitem(last=False)
        return value

    def __getstate__(self):
        return {"size": self.size, "data": OrderedDict()}


class BlockShuffleSampler(Sampler):
    """Shuffled order that keeps a volume's slices close: volumes are shuffled, taken `block` at a
    time, and the slices of each block are shuffled together. With a volume cache of >= `block`
    volumes, every volume is decoded once per epoch (per loader worker)."""

    def __init__(self, volume_of: Sequence[int], block: int = 4, seed: int = 0):
        self.volume_of, self.block, self.seed, self.epoch = np.asarray(volume_of), max(1, block), seed, 0

    def __len__(self) -> int:
        return len(self.volume_of)

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        vols = rng.permutation(np.unique(self.volume_of))
        for b in range(0, len(vols), self.block):
            idx = np.flatnonzero(np.isin(self.volume_of, vols[b:b + self.block]))
            yield from rng.permutation(idx).tolist()


class DecathlonDataModule(MedicalDataModule):
    """Medical Segmentation Decathlon task folder: `dataset.json` ("labels" {"0": "background", ...},
    "training" [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}], "numTraining").

    Only "training" has labels, so train / val / test are cut from it BY VOLUME
    (`split_by_group`, `fractions` default 70 / 15 / 15, seeded): no volume is in two splits.
    Every split yields 2D slices along the LAST array axis (axial for the MSD NIfTIs, stored
    voxel order, no reorientation): ``(x (3, S, S), mask (S, S) int64)``. Intensities are
    scaled over the whole volume (default ``intensity="percentile"``; a fixed window such as
    ``[-160, 240]`` suits CT). 4D multi-modal images (H, W, D, C) use channel `modality`.

    `volumes(split)` lists (image_path, label_path) for volume-level evaluation and
    `load_volume(image, label)` gives ``(x (D, 3, S, S), mask (D, S, S) or None)`` through the
    same pipeline. Training slices are served volume-block-wise (`BlockShuffleSampler`) from an
    LRU cache of `cache_volumes` decoded volumes per worker. `few_shot=k` keeps k training volumes.
    """

    name = "decathlon"
    task = "segmentation"
    protocol = "dataset.json training volumes split by volume"
    default_intensity = "percentile"
    few_shot_unit = "volume"

    def __init__(self, root: str, modality: int = 0, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                 cache_volumes: int = 4, **kw):
        self.modality, self.fractions, self.cache_volumes = int(modality), tuple(fractions), int(cache_volumes)
        self._cache = _VolumeCache(self.cache_volumes)
        super().__init__(root, **kw)

    def read_splits(self) -> dict[str, Split]:
        import nibabel as nib

        path = self.root / "dataset.json"
        if not path.is_file():
            raise DatasetLayoutError(f"{path}: dataset description not found")
        try:
            meta = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise DatasetLayoutError(f"{path}: not valid JSON ({err})") from err
        for key in ("labels", "training"):
            if key not in meta:
                raise DatasetLayoutError(f"{path}: missing field {key!r}")
        try:
            lab = {int(k): str(v) for k, v in dict(meta["labels"]).items()}
        except (TypeError, ValueError) as err:
            raise DatasetLayoutError(f"{path}: field 'labels' must map integer strings to names ({err})") from err
        if sorted(lab) != list(range(len(lab))) or len(lab) < 2:
            raise DatasetLayoutError(f"{path}: field 'labels' must have keys 0..L-1 (L >= 2), got {sorted(lab)}")
        self.labels = [lab[i] for i in range(len(lab))]
        if meta.get("name"):
            self.name = f"decathlon-{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(meta['name']))}"
        entries = meta["training"]
        if not isinstance(entries, list) or not entries:
            raise DatasetLayoutError(f"{path}: field 'training' must be a non-empty list")
        if "numTraining" in meta and meta["numTraining"] != len(entries):
            log.warning("%s: numTraining is %s but 'training' lists %d volumes", path, meta["numTraining"],
                        len(entries))

        volumes, depths = [], []
        for j, e in enumerate(entries):
            if not isinstance(e, dict) or "image" not in e or "label" not in e:
                raise DatasetLayoutError(f"{path}: training[{j}] must have 'image' and 'label'")
            img, lbl = self.root / e["image"], self.root / e["label"]
            for p, key in ((img, "image"), (lbl, "label")):
                if not p.is_file():
                    raise DatasetLayoutError(f"{path}: training[{j}] {key!r} file {p} not found")
            shapes = {}
            for p in (img, lbl):
                try:
                    shapes[p] = tuple(nib.load(str(p)).shape)
                except Exception as err:
                    raise ImageReadError(f"{p}: cannot read as nifti ({type(err).__name__}: {err})") from err
            ishape, lshape = shapes[img], shapes[lbl]
            if len(lshape) != 3:
                raise ImageReadError(f"{lbl}: expected a 3D label volume, got shape {lshape}")
            check_same_shape(np.empty(ishape, dtype=np.uint8), np.empty(lshape, dtype=np.uint8), img, lbl)
            if len(ishape) == 4 and not 0 <= self.modality < ishape[3]:
                raise DatasetLayoutError(f"{img}: modality {self.modality} does not exist ({ishape[3]} channels)")
            if len(ishape) == 3 and self.modality != 0:
                raise DatasetLayoutError(f"{img}: single-modality volume, modality must be 0")
            volumes.append((img, lbl))
            depths.append(lshape[-1])
        self._volumes = volumes
        try:
            parts = split_by_group(np.arange(len(volumes)), self.fractions, seed=self.seed)
        except ValueError as err:
            raise DatasetLayoutError(f"{path}: {len(volumes)} training volumes are too few to split ({err})") from err
        self.volume_splits = {s: [int(v) for v in p] for s, p in zip(SPLITS, parts)}
        return {s: self._slices(self.volume_splits[s], depths) for s in SPLITS}

    def _slices(self, vols: Sequence[int], depths: Sequence[int]) -> Split:
        items = [(v, k) for v in vols for k in range(depths[v])]
        return Split(items, None, np.asarray([v for v, _ in items], dtype=np.int64))

    def _few_shot(self, split: Split, k: int) -> Split:
        vols = np.unique(split.groups)
        keep = few_shot_indices(np.zeros(len(vols), dtype=np.int64), k, seed=self.seed, label_names=["volume"])
        kept = set(vols[keep].tolist())
        self.volume_splits["train"] = sorted(kept)
        return split.subset(np.flatnonzero(np.isin(split.groups, list(kept))))

    def volumes(self, split: str) -> list[tuple[Path, Path]]:
        """(image_path, label_path) of every volume in `split` (after few-shot for train)."""
        return [self._volumes[v] for v in self.volume_splits[split]]

    def _read_volume(self, img_path: Path, lbl_path: Path | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        img = read_image(img_path)
        lbl = None
        if lbl_path is not None:
            lbl = read_mask(lbl_path)
            check_same_shape(img, lbl, img_path, lbl_path)
            bad = lbl[(lbl < 0) | (lbl >= self.num_classes)]
            if bad.size:
                raise DatasetLayoutError(f"{lbl_path}: label value {int(bad[0])} outside 0..{self.num_classes - 1} "
                                         f"(dataset.json 'labels' has {self.num_classes})")
            lbl = torch.from_numpy(lbl)
        if img.ndim == 4:
            if not 0 <= self.modality < img.shape[3]:
                raise ImageReadError(f"{img_path}: modality {self.modality} does not exist ({img.shape[3]} channels)")
            img = img[..., self.modality]
        if img.ndim != 3:
            raise ImageReadError(f"{img_path}: expected a 3D or 4D volume, got shape {img.shape}")
        return scale_intensity(img, self.intensity), lbl

    def load(self, item, augment=None):
        v, k = item
        img, lbl = self._cache.get(v, lambda: self._read_volume(*self._volumes[v]))
        return finish(img[..., k][None], self.img_size, augment, mask=lbl[..., k])

    def load_volume(self, image_path: str | Path, label_path: str | Path | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A whole volume as the model sees its slices: (x (D, 3, S, S), mask (D, S, S) or None),
        D = the last array axis of the NIfTI."""
        img, lbl = self._read_volume(Path(image_path), None if label_path is None else Path(label_path))
        x = volume_to_slices(img, self.img_size, axis=-1, scaled=True)
        return x, None if lbl is None else mask_to_size(torch.movedim(lbl, -1, 0), self.img_size)

    def train_sampler(self, ds: Dataset) -> Sampler:
        return BlockShuffleSampler(self.splits["train"].groups, block=self.cache_volumes, seed=self.seed)

    def preprocessing_extra(self) -> dict:
        return {"slice_axis": -1, "modality": self.modality}
