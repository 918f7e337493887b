"""What every medical data module shares: the split record, the item dataset, the layout error,
CSV / list readers, the stratified split, the masked BCE for ignored labels, and `MedicalDataModule`."""
from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from shared.data import balanced_sampler, few_shot_indices, pos_weight

from ..io import SUPPORTED_EXTENSIONS, ImageReadError, read_image
from ..transforms import (
    Intensity,
    augmentation,
    check_intensity,
    preprocessing_dict,
    to_model_input,
)

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class DatasetLayoutError(ValueError):
    """The dataset folder does not have the expected layout; the message names the file or field."""



def read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV with a header; DatasetLayoutError naming the file if it or a column is missing."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: metadata file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        missing = [c for c in required if c not in fields]
        if missing:
            raise DatasetLayoutError(f"{path}: missing column(s) {missing}; found {fields}")
        return list(reader)


def read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: official split list not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (supported extensions, hidden files skipped), sorted."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(SUPPORTED_EXTENSIONS))


def stratified_split(labels: Sequence[int] | np.ndarray, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                     seed: int = 0) -> tuple[np.ndarray, ...]:
    """Seeded split keeping each class's proportions: per class, shuffle then cut at the rounded
    cumulative fractions. Returns one sorted index array per fraction."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        cuts = np.round(np.cumsum(fractions) * len(idx)).astype(int)
        cuts[-1] = len(idx)
        for s, (lo, hi) in enumerate(zip(np.concatenate([[0], cuts[:-1]]), cuts)):
            parts[s].extend(idx[lo:hi].tolist())
    return tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)


def masked_bce(logits: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the entries of `y` that are not NaN.

    NaN marks "ignored" labels (CheXpert ``uncertainty="ignore"``): they add neither loss nor
    gradient. With no valid entry at all the loss is 0 (still connected to the graph).
    """
    valid = ~torch.isnan(y)
    target = torch.where(valid, y, torch.zeros_like(y))
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pos_weight)
    loss = loss * valid
    return loss.sum() / valid.sum().clamp_min(1)


@dataclass
class Split:
    """One split: `items` (whatever the module's `load` takes), `targets` ((N,) int64, (N, C) float32,
    or None for segmentation) and optional `groups` (patient ids)."""

    items: list
    targets: np.ndarray | None = None
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Split:
        idx = np.asarray(idx, dtype=np.int64)
        return Split([self.items[i] for i in idx],
                     None if self.targets is None else self.targets[idx],
                     None if self.groups is None else self.groups[idx])


class ItemDataset(Dataset):
    """`load(item, augment)` per item; with targets yields (x, y), y long scalar or float (C,)."""

    def __init__(self, split: Split, load: Callable[[Any, Any], Any], augment: Callable | None = None):
        self.split, self.load, self.augment = split, load, augment

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        out = self.load(self.split.items[i], self.augment)
        if self.split.targets is None:
            return out
        t = self.split.targets[i]
        y = torch.tensor(t, dtype=torch.float32) if np.ndim(t) else torch.tensor(int(t), dtype=torch.long)
        return out, y


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream (MONAI transforms carry their own RNG,
    which forked workers would otherwise share)."""
    info = torch.utils.data.get_worker_info()
    aug = getattr(info.dataset, "augment", None) if info is not None else None
    if aug is not None:
        aug.set_random_state(seed=torch.initial_seed() % 2**32)


# --------------------------------------------------------------------------- base module


class MedicalDataModule(L.LightningDataModule):
    """Shared machinery; subclasses fill `labels` / `multilabel` and return the splits in `read_splits`,
    and turn one item into tensors in `load`."""

    name: ClassVar[str] = "medical"
    task: ClassVar[str] = "classification"  # or "segmentation"
    default_intensity: ClassVar[str] = "minmax"
    few_shot_unit: ClassVar[str] = "image"  # what few-shot counts for segmentation
    protocol: str = "official"  # how train / val / test are made (written to metrics.json)
    # What the images are, recorded in the bundle (preprocessing.input) so that medical.predict can warn
    # about a DICOM of another modality / body part: DICOM Modality ("CR/DX": either) and
    # BodyPartExamined values. A recipe sets it with `imaging: {modality: CT, body_part: ABDOMEN}`.
    default_imaging: ClassVar[dict[str, str]] = {}

    def __init__(self, root: str, img_size: int = 224, batch_size: int = 32, num_workers: int = 0,
                 few_shot: int | None = None, seed: int = 0, augment: bool = False,
                 intensity: str | list[float] | None = None, balanced_sampler: bool = False,
                 imaging: dict[str, str] | None = None):
        super().__init__()
        self.given_imaging = None if imaging is None else self._check_imaging(imaging)
        self.balanced_sampler = balanced_sampler
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DatasetLayoutError(f"{self.root}: dataset not found")
        self.img_size, self.batch_size, self.num_workers = int(img_size), batch_size, num_workers
        self.few_shot, self.seed, self.augment = few_shot, seed, augment
        self.intensity: Intensity = check_intensity(intensity if intensity is not None else self.default_intensity)
        self.labels: list[str] = []
        self.multilabel: bool = False
        self.splits: dict[str, Split] = self.read_splits()  # also fills labels / multilabel
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise TypeError(f"{type(self).__name__}.read_splits() returned no {missing}")
        if few_shot:
            self.splits["train"] = self._few_shot(self.splits["train"], few_shot)

    def __getstate__(self):
        # Loader workers started by spawn / forkserver pickle the dataset, which holds a bound
        # `load` of this module: leave the trainer (attached during fit) behind.
        state = self.__dict__.copy()
        state["trainer"] = None
        return state

    # ----------------------------------------------------------------- what subclasses provide
    def read_splits(self) -> dict[str, Split]:
        raise TypeError(f"{type(self).__name__} must define read_splits()")

    def load(self, item: Any, augment: Callable | None = None):
        raise TypeError(f"{type(self).__name__} must define load()")

    def preprocessing_extra(self) -> dict:
        return {}

    def imaging_default(self) -> dict[str, str]:
        """What this dataset's images are when the recipe does not say (`imaging`)."""
        return dict(self.default_imaging)

    @staticmethod
    def _check_imaging(given) -> dict[str, str]:
        if not isinstance(given, dict) or set(given) - {"modality", "body_part"}:
            raise DatasetLayoutError(f"imaging: {given!r}; expected a mapping with modality (DICOM Modality, e.g. "
                                     f"CR/DX, CT, MR) and / or body_part (DICOM BodyPartExamined, e.g. CHEST)")
        return {k: str(v).upper() for k, v in given.items() if v}

    @property
    def imaging(self) -> dict[str, str]:
        given = getattr(self, "given_imaging", None)
        return self.imaging_default() if given is None else given

    # ----------------------------------------------------------------- public
    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def preprocessing(self) -> dict:
        imaging = self.imaging
        return preprocessing_dict(self.img_size, self.intensity, **self.preprocessing_extra(),
                                  **({"input": imaging} if imaging else {}))

    def dataset(self, split: str, train: bool | None = None) -> ItemDataset:
        """The torch Dataset of a split; `train` (default: split == "train") enables augmentation."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        train = split == "train" if train is None else train
        aug = None
        if train and self.augment:
            aug = augmentation(segmentation=self.task == "segmentation", seed=self.seed)
        return ItemDataset(self.splits[split], self.load, aug)

    @property
    def pos_weight(self) -> list[float] | None:
        """Multi-label: negatives / positives per label in the training split (unknowns left out),
        the BCE `pos_weight` a model's ``pos_weight: auto`` reads; None for single-label data."""
        t = self.splits["train"].targets
        return pos_weight(t) if self.multilabel and t is not None else None

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        ds = self.dataset(split)
        sampler = self.train_sampler(ds) if train else None  # under DDP: Lightning's share (shared.distributed)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=train and sampler is None, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          worker_init_fn=_seed_worker)

    def train_sampler(self, ds: Dataset) -> Sampler | None:
        if not self.balanced_sampler:
            return None
        t = self.splits["train"].targets
        if t is None or t.ndim != 1:
            raise ValueError(f"{type(self).__name__}: balanced_sampler is for single-label classification; "
                             f"multi-label data balances labels with the model's pos_weight")
        return balanced_sampler(t, self.seed)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("test")

    # ----------------------------------------------------------------- helpers
    def _few_shot(self, split: Split, k: int) -> Split:
        if split.targets is None:  # segmentation: k training images / volumes
            labels, names = np.zeros(len(split), dtype=np.int64), [self.few_shot_unit]
        elif split.targets.ndim == 2:
            labels, names = (np.nan_to_num(split.targets, nan=0.0) == 1).astype(np.int64), self.labels
        else:
            labels, names = split.targets, self.labels
        keep = few_shot_indices(labels, k, seed=self.seed, groups=split.groups, label_names=names)
        return split.subset(keep)

    def _image_input(self, path: Path, augment: Callable | None) -> torch.Tensor:
        img = read_image(path)
        if img.ndim == 3 and img.shape[-1] not in (1, 3) and 1 in img.shape:
            img = img.squeeze()  # e.g. a (1, H, W) NIfTI / multi-frame DICOM with one frame
        if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (1, 3))):
            raise ImageReadError(f"{path}: expected a 2D image, got shape {img.shape}")
        return to_model_input(img, self.img_size, self.intensity, augment)
