"""Lightning data modules for radiology: MedMNIST, NIH ChestX-ray14, CheXpert, image folders, lung
masks (Montgomery / Shenzhen) and the Medical Segmentation Decathlon.

Every module reads its dataset's official on-disk layout (never the network) and knows its labels
right after construction, so the CLI can link `data.num_classes`, `data.labels`,
`data.multilabel` and `data.preprocessing` into the model. Common constructor arguments:
``root, img_size=224, batch_size=32, num_workers=0, few_shot=None, seed=0, augment=False,
intensity="minmax"`` (see `medical.transforms` for the preprocessing; `augment` turns on the
train-time random flip / rotation).

Batches
-------
* classification, 2D: ``(x (B, 3, S, S) float32, y)``; 3D volumes (MedMNIST3D):
  ``x (B, D, 3, S, S)``, slices along the first axis.
* ``y``: int64 ``(B,)`` when single-label; float32 ``(B, C)`` multi-hot when ``multilabel``
  (ChestX-ray14, ChestMNIST, CheXpert). With CheXpert ``uncertainty="ignore"`` the uncertain
  entries are NaN: the loss must mask them, e.g. `masked_bce` below (and metrics must skip them).
* segmentation (LungMask, Decathlon): ``(x (B, 3, S, S), mask (B, S, S) int64)``, mask values in
  ``range(num_classes)``, class 0 = background.

Few-shot (``few_shot=k``) keeps k training units per class with `shared.data.few_shot_indices`
(rarest class first, seeded); units are patients where the dataset has patient ids (ChestX-ray14
"Patient ID", CheXpert's patientNNNNN folder), images otherwise. Multi-label: a sample counts for
the classes where its target is 1, so all-negative samples ("No Finding" in ChestX-ray14) are never
drawn. Segmentation: k training images (LungMask) or k training volumes (Decathlon). A class with
fewer than k units raises ValueError naming the class. Validation and test splits are never cut.

Layout problems raise `DatasetLayoutError` (a ValueError) naming the file and field; an unusable
image or mask raises `medical.io.ImageReadError` naming the file(s).
"""
from __future__ import annotations

import csv
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from shared.data import balanced_sampler, eval_sampler, few_shot_indices, pos_weight, split_by_group

from .io import SUPPORTED_EXTENSIONS, ImageReadError, check_same_shape, read_image, read_mask
from .transforms import (Intensity, augmentation, check_intensity, finish, mask_to_size, preprocessing_dict,
                         scale_intensity, to_model_input, volume_to_slices)

__all__ = [
    "DatasetLayoutError",
    "Split",
    "MedicalDataModule",
    "MedMNISTDataModule",
    "ChestXray14DataModule",
    "CheXpertDataModule",
    "ImageFolderDataModule",
    "LungMaskDataModule",
    "DecathlonDataModule",
    "masked_bce",
    "stratified_split",
    "MEDMNIST_LABELS",
    "CXR14_LABELS",
    "CHEXPERT_LABELS",
    "CHEXPERT_COMPETITION",
    "DATASETS",
]

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class DatasetLayoutError(ValueError):
    """The dataset folder does not have the expected layout; the message names the file or field."""


# --------------------------------------------------------------------------- label sets

CXR14_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]

CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices"]
# The five observations of the CheXpert competition, which the literature reports.
CHEXPERT_COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]

_ORGANS_2D = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
              "lung-right", "pancreas", "spleen"]
# MedMNIST v2 label names (index order), from the official INFO of the medmnist package.
MEDMNIST_LABELS: dict[str, list[str]] = {
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
                  "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
    "chestmnist": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                   "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"],
    "tissuemnist": ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
                    "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
                    "Thick Ascending Limb"],
    "organamnist": _ORGANS_2D,
    "organcmnist": _ORGANS_2D,
    "organsmnist": _ORGANS_2D,
    "organmnist3d": ["liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder", "heart",
                     "lung-right", "lung-left", "spleen", "pancreas"],
    "nodulemnist3d": ["benign", "malignant"],
    "adrenalmnist3d": ["normal", "hyperplasia"],
    "fracturemnist3d": ["buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"],
    "vesselmnist3d": ["vessel", "aneurysm"],
    "synapsemnist3d": ["inhibitory synapse", "excitatory synapse"],
}
MEDMNIST_MULTILABEL = {"chestmnist"}


# --------------------------------------------------------------------------- helpers


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

    def __init__(self, root: str, img_size: int = 224, batch_size: int = 32, num_workers: int = 0,
                 few_shot: int | None = None, seed: int = 0, augment: bool = False,
                 intensity: str | list[float] | None = None, balanced_sampler: bool = False):
        super().__init__()
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

    # ----------------------------------------------------------------- public
    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def preprocessing(self) -> dict:
        return preprocessing_dict(self.img_size, self.intensity, **self.preprocessing_extra())

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
        sampler = self.train_sampler(ds) if train else eval_sampler(ds)  # no repeated samples under DDP
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


# --------------------------------------------------------------------------- MedMNIST


class MedMNISTDataModule(MedicalDataModule):
    """MedMNIST v2 / MedMNIST+ `.npz` (keys train/val/test _images / _labels), official splits.

    `root` is the `.npz` file or a folder holding `<flag>.npz` (size 28) or `<flag>_<size>.npz`.
    A file's name gives the flag and size (`breastmnist_224.npz` -> breastmnist, 224); an explicit
    `flag` / `size` that disagrees with the name is refused (the label names depend on the flag).
    A folder root needs `flag`. Images (N, H, W) or (N, H, W, 3) are 2D; (N, D, H, W) are 3D
    volumes, yielded as (D, 3, S, S) slice stacks (axis 0). Labels (N, 1) are single-label,
    (N, C > 1) multi-label (ChestMNIST). Label names come from `MEDMNIST_LABELS`; an unknown
    flag gets "class_i".
    """

    name = "medmnist"
    protocol = "official splits"
    FILE_NAME = re.compile(r"^(?P<flag>[a-z0-9]+?)(?:_(?P<size>\d+))?\.npz$")

    def __init__(self, root: str, flag: str | None = None, size: int | None = None, **kw):
        path = Path(root).expanduser()
        flag = flag.lower() if flag else None
        if path.is_file():
            m = self.FILE_NAME.match(path.name.lower())
            file_flag = m["flag"] if m else None
            file_size = int(m["size"]) if m and m["size"] else 28
            if file_flag in MEDMNIST_LABELS:
                if flag is not None and flag != file_flag:
                    raise DatasetLayoutError(f"{path}: the file name says flag {file_flag!r} but flag is {flag!r} "
                                             f"(label names differ between flags); drop --data.flag or rename")
                if size is not None and int(size) != file_size:
                    raise DatasetLayoutError(f"{path}: the file name says size {file_size} but size is {size}")
                flag, size = file_flag, file_size
            elif flag is None:
                flag = path.stem.lower()  # not a MedMNIST name: generic class names, said below
                log.warning("%s: file name is not <flag>[_<size>].npz of a known MedMNIST flag; labels are "
                            "class_0.. (set flag for the official names)", path)
        elif flag is None:
            raise DatasetLayoutError(f"{path}: a folder root needs flag (e.g. pneumoniamnist) to pick the .npz file")
        self.flag, self.size = flag, int(size or 28)
        self.name = self.flag if self.size == 28 else f"{self.flag}_{self.size}"
        super().__init__(root, **kw)

    def _npz_path(self) -> Path:
        if self.root.is_file():
            return self.root
        names = [f"{self.flag}_{self.size}.npz"]
        if self.size == 28:
            names.insert(0, f"{self.flag}.npz")
        for n in names:
            if (self.root / n).is_file():
                return self.root / n
        raise DatasetLayoutError(f"{self.root}: no MedMNIST file {' or '.join(names)}")

    def read_splits(self) -> dict[str, Split]:
        path = self.npz_path = self._npz_path()
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = set(z.files)
                want = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
                missing = [k for k in want if k not in keys]
                if missing:
                    raise DatasetLayoutError(f"{path}: missing key(s) {missing}; found {sorted(keys)}")
                arrays = {k: z[k] for k in want}
        except DatasetLayoutError:
            raise
        except Exception as err:
            raise DatasetLayoutError(f"{path}: not a readable .npz ({type(err).__name__}: {err})") from err

        ndims = {arrays[f"{s}_images"].ndim for s in SPLITS}
        shapes = {arrays[f"{s}_images"].shape[1:] for s in SPLITS}
        if len(shapes) != 1:
            raise DatasetLayoutError(f"{path}: image shapes differ between splits: {sorted(shapes)}")
        shape = shapes.pop()
        if ndims != {3} and ndims != {4}:
            raise DatasetLayoutError(f"{path}: train_images must be (N, H, W), (N, H, W, 3) or (N, D, H, W); "
                                     f"got (N, {', '.join(map(str, shape))})")
        self.volumetric = len(shape) == 3 and shape[-1] != 3

        labels: dict[str, np.ndarray] = {}
        for s in SPLITS:
            y = arrays[f"{s}_labels"]
            y = y[:, None] if y.ndim == 1 else y
            if y.ndim != 2 or len(y) != len(arrays[f"{s}_images"]):
                raise DatasetLayoutError(f"{path}: {s}_labels has shape {arrays[f'{s}_labels'].shape}, expected "
                                         f"(N, 1) or (N, C) with N = {len(arrays[f'{s}_images'])}")
            if not np.issubdtype(y.dtype, np.integer) and not np.array_equal(y, np.round(y)):
                raise DatasetLayoutError(f"{path}: {s}_labels has non-integer values")
            labels[s] = y.astype(np.int64)
        cols = {y.shape[1] for y in labels.values()}
        if len(cols) != 1:
            raise DatasetLayoutError(f"{path}: label columns differ between splits: {sorted(cols)}")
        n_cols = cols.pop()
        known = MEDMNIST_LABELS.get(self.flag)
        self.multilabel = n_cols > 1
        if self.flag in MEDMNIST_MULTILABEL and not self.multilabel:
            raise DatasetLayoutError(f"{path}: {self.flag} is multi-label but the labels have one column")

        splits = {}
        if self.multilabel:
            if known is not None and n_cols != len(known):
                raise DatasetLayoutError(f"{path}: labels have {n_cols} columns, {self.flag} has {len(known)} labels")
            self.labels = list(known) if known else [f"class_{i}" for i in range(n_cols)]
            for s in SPLITS:
                if not np.isin(labels[s], (0, 1)).all():
                    bad = labels[s][~np.isin(labels[s], (0, 1))][0]
                    raise DatasetLayoutError(f"{path}: {s}_labels has value {bad}; multi-label targets must be 0 or 1")
                splits[s] = Split([(s, i) for i in range(len(labels[s]))], labels[s].astype(np.float32))
        else:
            n = len(known) if known else int(max(y.max() for y in labels.values())) + 1
            self.labels = list(known) if known else [f"class_{i}" for i in range(n)]
            for s in SPLITS:
                y = labels[s][:, 0]
                bad = y[(y < 0) | (y >= n)]
                if len(bad):
                    raise DatasetLayoutError(f"{path}: {s}_labels has class id {bad[0]} outside 0..{n - 1} "
                                             f"({self.flag} has {n} classes)")
                splits[s] = Split([(s, i) for i in range(len(y))], y)
        self._images = {s: arrays[f"{s}_images"] for s in SPLITS}
        return splits

    def load(self, item, augment=None):
        split, i = item
        img = self._images[split][i]
        if self.volumetric:
            return volume_to_slices(img, self.img_size, self.intensity, axis=0, augment=augment)
        return to_model_input(img, self.img_size, self.intensity, augment)

    def preprocessing_extra(self) -> dict:
        return {"volume_axis": 0} if self.volumetric else {}


# --------------------------------------------------------------------------- NIH ChestX-ray14


class ChestXray14DataModule(MedicalDataModule):
    """NIH ChestX-ray14: `Data_Entry_2017.csv` ("Image Index", "Finding Labels" `|`-separated,
    "Patient ID"), `train_val_list.txt`, `test_list.txt`, PNGs under `images/` or
    `images_NNN/images/` (the official archives).

    Multi-label over the 14 findings (`CXR14_LABELS`); "No Finding" is all zeros. Test = the
    official `test_list.txt`; validation = `val_fraction` of the train_val PATIENTS
    (`shared.data.split_by_group`, seeded), so no patient is in both train and val (the official
    lists are already patient-disjoint from test).
    """

    name = "chestxray14"
    few_shot_unit = "patient"
    protocol = "official test_list.txt; validation = train_val patients"

    def __init__(self, root: str, val_fraction: float = 0.1, **kw):
        self.val_fraction = val_fraction
        super().__init__(root, **kw)

    def _csv(self) -> Path:
        for n in ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"):
            if (self.root / n).is_file():
                return self.root / n
        raise DatasetLayoutError(f"{self.root / 'Data_Entry_2017.csv'}: metadata file not found")

    def _image_index(self) -> dict[str, Path]:
        dirs = [self.root / "images"] + sorted(p / "images" for p in self.root.glob("images_*") if p.is_dir())
        index: dict[str, Path] = {}
        for d in dirs:
            if d.is_dir():
                for p in d.iterdir():
                    index.setdefault(p.name, p)
        if not index:
            raise DatasetLayoutError(f"{self.root}: no images under images/ or images_*/images/")
        return index

    def read_splits(self) -> dict[str, Split]:
        path = self._csv()
        rows = read_csv(path, ["Image Index", "Finding Labels", "Patient ID"])
        col = {n: j for j, n in enumerate(CXR14_LABELS)}
        table: dict[str, tuple[np.ndarray, str]] = {}
        for i, r in enumerate(rows, start=2):  # line 1 is the header
            y = np.zeros(len(CXR14_LABELS), dtype=np.float32)
            for f in (f.strip() for f in r["Finding Labels"].split("|")):
                if f in ("No Finding", ""):
                    continue
                if f not in col:
                    raise DatasetLayoutError(f"{path}: line {i} ({r['Image Index']}): finding {f!r} in "
                                             f"'Finding Labels' is not one of the 14 labels {CXR14_LABELS}")
                y[col[f]] = 1.0
            pid = r["Patient ID"].strip()
            if not pid:
                raise DatasetLayoutError(f"{path}: line {i} ({r['Image Index']}): empty 'Patient ID'")
            table[r["Image Index"].strip()] = (y, pid)

        lists = {s: read_list(self.root / f)
                 for s, f in (("train_val", "train_val_list.txt"), ("test", "test_list.txt"))}
        both = set(lists["train_val"]) & set(lists["test"])
        if both:
            raise DatasetLayoutError(f"{self.root}: {len(both)} image(s) in both train_val_list.txt and "
                                     f"test_list.txt, e.g. {sorted(both)[0]}")
        index = self._image_index()
        parts = {}
        for s, names in lists.items():
            fname = "train_val_list.txt" if s == "train_val" else "test_list.txt"
            unknown = [n for n in names if n not in table]
            if unknown:
                raise DatasetLayoutError(f"{self.root / fname}: {len(unknown)} image(s) not in {path.name}, "
                                         f"e.g. {unknown[0]}")
            absent = [n for n in names if n not in index]
            if absent:
                raise DatasetLayoutError(f"{self.root / fname}: {len(absent)} listed image(s) not found under "
                                         f"images/ or images_*/images/, e.g. {absent[0]}")
            parts[s] = Split([index[n] for n in names], np.stack([table[n][0] for n in names]),
                             np.asarray([table[n][1] for n in names]))
        shared_patients = set(parts["train_val"].groups) & set(parts["test"].groups)
        if shared_patients:
            log.warning("ChestX-ray14: %d patient(s) appear in both train_val and test lists", len(shared_patients))
        self.labels, self.multilabel = list(CXR14_LABELS), True
        tr, va = split_by_group(parts["train_val"].groups, (1 - self.val_fraction, self.val_fraction), seed=self.seed)
        return {"train": parts["train_val"].subset(tr), "val": parts["train_val"].subset(va), "test": parts["test"]}

    def load(self, item, augment=None):
        return self._image_input(item, augment)


# --------------------------------------------------------------------------- CheXpert


class CheXpertDataModule(MedicalDataModule):
    """CheXpert (v1.0 / v1.0-small): `train.csv`, `valid.csv` with a "Path" column
    ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg") and the 14 observation
    columns (`CHEXPERT_LABELS`) holding 1.0 / 0.0 / -1.0 (uncertain) / blank.

    `root` is the folder with the CSVs; a Path is looked up under `root.parent`, then `root`, then
    `root` without the Path's first component (a renamed folder).

    Targets (multi-label, float): blank -> 0; in TRAINING, -1 -> 1 (``uncertainty="ones"``,
    U-Ones), 0 ("zeros") or NaN ("ignore": masked out of the loss, see `masked_bce`);
    `uncertainty` may also be a dict {observation: policy} (missing observations use "ones"). In
    validation and test, -1 is always NaN: an uncertain label is not scored, whatever the training
    policy. `labels`: "all" (the 14 observations) or "competition" (`CHEXPERT_COMPETITION`: the 5
    the literature reports). An observation without positives or without negatives in an
    evaluation split is named in a warning; the metrics leave it out (`shared.module`).

    Splits: validation = the official `valid.csv` (radiologist-labelled); test = `test_fraction`
    of the train.csv PATIENTS held out (seeded `split_by_group`), because the official test set is
    not in the download and testing on valid.csv would also be the model-selection set.
    `frontal_only=True` keeps rows whose "Frontal/Lateral" is "Frontal".
    """

    name = "chexpert"
    few_shot_unit = "patient"
    protocol = "valid.csv validates; held-out train.csv patients test"
    POLICIES = ("ones", "zeros", "ignore")
    LABEL_SETS = {"all": CHEXPERT_LABELS, "competition": CHEXPERT_COMPETITION}

    def __init__(self, root: str, uncertainty: str | dict[str, str] = "ones", test_fraction: float = 0.1,
                 frontal_only: bool = False, labels: str = "all", **kw):
        if labels not in self.LABEL_SETS:
            raise ValueError(f"CheXpert: labels must be one of {sorted(self.LABEL_SETS)}, got {labels!r}")
        self.label_set = labels
        policies = uncertainty if isinstance(uncertainty, dict) else {n: uncertainty for n in CHEXPERT_LABELS}
        for n, p in policies.items():
            if n not in CHEXPERT_LABELS:
                raise ValueError(f"uncertainty: {n!r} is not a CheXpert observation {CHEXPERT_LABELS}")
            if p not in self.POLICIES:
                raise ValueError(f"uncertainty for {n!r} must be one of {self.POLICIES}, got {p!r}")
        self.uncertainty = {n: policies.get(n, "ones") for n in CHEXPERT_LABELS}
        self.test_fraction, self.frontal_only = test_fraction, frontal_only
        super().__init__(root, **kw)

    def _value(self, raw: str, obs: str, where: str) -> float:
        raw = raw.strip()
        if raw == "":
            return 0.0
        try:
            v = float(raw)
        except ValueError:
            v = None
        if v in (1.0, 0.0, -1.0):
            return v  # -1 (uncertain) is resolved per split in `_targets`
        raise DatasetLayoutError(f"{where}: column {obs!r} has value {raw!r}; expected 1.0, 0.0, -1.0 or blank")

    def _resolver(self, rel: str, csv_path: Path) -> Callable[[str], Path]:
        tail = lambda r: Path(*Path(r).parts[1:]) if len(Path(r).parts) > 1 else Path(r)  # noqa: E731
        candidates = [lambda r: self.root.parent / r, lambda r: self.root / r, lambda r: self.root / tail(r)]
        for c in candidates:
            if c(rel).is_file():
                return c
        raise DatasetLayoutError(f"{csv_path}: image {rel!r} (column 'Path') not found under {self.root.parent}, "
                                 f"{self.root} or {self.root / tail(rel)}")

    def _read(self, csv_name: str) -> Split:
        path = self.root / csv_name
        rows = read_csv(path, ["Path", *CHEXPERT_LABELS] + (["Frontal/Lateral"] if self.frontal_only else []))
        if self.frontal_only:
            rows = [r for r in rows if r["Frontal/Lateral"].strip().lower() == "frontal"]
        if not rows:
            raise DatasetLayoutError(f"{path}: no rows")
        resolve = self._resolver(rows[0]["Path"], path)
        items, targets, groups = [], [], []
        for i, r in enumerate(rows, start=2):
            where = f"{path}: line {i}"
            m = re.search(r"(patient\d+)", r["Path"])
            if not m:
                raise DatasetLayoutError(f"{where}: no patientNNNNN folder in 'Path' {r['Path']!r}")
            items.append(resolve(r["Path"]))
            targets.append([self._value(r[o], o, where) for o in self.labels])
            groups.append(m.group(1))
        absent = [p for p in items if not p.is_file()]
        if absent:
            raise DatasetLayoutError(f"{path}: {len(absent)} image(s) in column 'Path' not found, e.g. {absent[0]}")
        return Split(items, np.asarray(targets, dtype=np.float32), np.asarray(groups))

    def _targets(self, raw: np.ndarray, train: bool) -> np.ndarray:
        """Resolve the uncertain (-1) entries: the policy in training, NaN (not scored) elsewhere."""
        out = raw.copy()
        for j, obs in enumerate(self.labels):
            policy = self.uncertainty[obs] if train else "ignore"
            out[raw[:, j] == -1.0, j] = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[policy]
        return out

    def read_splits(self) -> dict[str, Split]:
        self.labels, self.multilabel = list(self.LABEL_SETS[self.label_set]), True
        train_all, val = self._read("train.csv"), self._read("valid.csv")
        tr, te = split_by_group(train_all.groups, (1 - self.test_fraction, self.test_fraction), seed=self.seed)
        splits = {"train": train_all.subset(tr), "val": val, "test": train_all.subset(te)}
        for name, split in splits.items():
            split.targets = self._targets(split.targets, train=name == "train")
            if name != "train":
                t = split.targets
                undefined = [o for j, o in enumerate(self.labels)
                             if not ((t[:, j] == 1).any() and (t[:, j] == 0).any())]
                if undefined:
                    log.warning("CheXpert %s split: %d observation(s) without positives or without negatives "
                                "are left out of AUROC / AP: %s", name, len(undefined), undefined)
        return splits

    def load(self, item, augment=None):
        return self._image_input(item, augment)


# --------------------------------------------------------------------------- image folders


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(SUPPORTED_EXTENSIONS))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


class ImageFolderDataModule(MedicalDataModule):
    """`root/{train,val,test}/<class>/<image>` (png, jpg, dcm, nii(.gz), npy; 2D images).

    "valid" / "validation" are accepted for "val". Classes are the sorted folders of train; a
    class folder only in val/test is an error. A missing val or test folder is carved from train
    (15 % each, stratified, seeded). When there is no train folder, `root/<class>/` is split
    70 / 15 / 15 stratified by class (seeded).

    `group_pattern`: a regex searched in each file name whose first matched group (or the whole
    match) is the patient id, e.g. ``"^(person\\d+)_|IM-(\\d+)-"`` for the Kermany chest X-rays
    (`person1_virus_6.jpeg`, `IM-0115-0001.jpeg`). With it, carved splits are cut BY PATIENT
    (`split_by_group`, fractions of patients, not stratified), few-shot draws patients, and a
    patient found in two given split folders is warned about. A name the pattern does not match
    is its own patient. Without it, names that look grouped (`person12_...`, `patient3-...`)
    give a warning: carving by image would put one patient's images in train and val.
    """

    name = "imagefolder"
    LOOKS_GROUPED = re.compile(r"^(?:person|patient|pat|subject|subj|case)[-_]?\d+[-_]", re.IGNORECASE)

    def __init__(self, root: str, group_pattern: str | None = None, **kw):
        try:
            self.group_pattern = re.compile(group_pattern) if group_pattern else None
        except re.error as err:
            raise ValueError(f"group_pattern {group_pattern!r} is not a valid regex ({err})") from None
        super().__init__(root, **kw)

    def _groups(self, items: Sequence[Path]) -> np.ndarray | None:
        if self.group_pattern is None:
            return None
        ids, unmatched = [], 0
        for p in items:
            m = self.group_pattern.search(p.name)
            if m is None:
                unmatched += 1
                ids.append(f"file:{p}")
            else:
                ids.append(next((g for g in m.groups() if g), m.group(0)))
        if unmatched:
            log.warning("%s: group_pattern matched no patient id in %d of %d file names; each is its own group",
                        self.root, unmatched, len(items))
        return np.asarray(ids)

    def _split_unit(self) -> str:
        return "patient" if self.group_pattern is not None else "image"

    def read_splits(self) -> dict[str, Split]:
        if not self.root.is_dir():
            raise DatasetLayoutError(f"{self.root}: not a folder")
        split_dirs = {}
        for s, aliases in (("train", ("train",)), ("val", ("val", "valid", "validation")), ("test", ("test",))):
            for a in aliases:
                if (self.root / a).is_dir():
                    split_dirs[s] = self.root / a
                    break
        if split_dirs and "train" not in split_dirs:
            raise DatasetLayoutError(f"{self.root}: has {sorted(split_dirs)} folder(s) but no train/")
        base = split_dirs.get("train", self.root)
        classes = [d.name for d in _class_dirs(base)]
        if not classes:
            raise DatasetLayoutError(f"{base}: no class folders")
        self.labels = classes
        index = {c: j for j, c in enumerate(classes)}

        def collect(folder: Path, require_all: bool) -> Split:
            items, ys = [], []
            for d in _class_dirs(folder):
                if d.name not in index:
                    raise DatasetLayoutError(f"{d}: class folder {d.name!r} is not a class of {base} ({classes})")
                files = _image_files(d)
                if require_all and not files:
                    raise DatasetLayoutError(f"{d}: class folder has no images ({', '.join(SUPPORTED_EXTENSIONS)})")
                items += files
                ys += [index[d.name]] * len(files)
            return Split(items, np.asarray(ys, dtype=np.int64), self._groups(items))

        def carve(split: Split, fractions: list[float]) -> tuple[np.ndarray, ...]:
            if split.groups is None:
                return stratified_split(split.targets, fractions, self.seed)
            try:
                return split_by_group(split.groups, fractions, seed=self.seed)
            except ValueError as err:
                raise DatasetLayoutError(f"{self.root}: too few patients to split by group_pattern ({err})") from None

        if not split_dirs:
            everything = collect(self.root, True)
            self._warn_if_grouped(everything)
            parts = carve(everything, [0.7, 0.15, 0.15])
            splits = {s: everything.subset(p) for s, p in zip(SPLITS, parts)}
            self.protocol = f"70/15/15 split by {self._split_unit()}"
        else:
            train = collect(split_dirs["train"], True)
            splits = {s: collect(split_dirs[s], False) for s in ("val", "test") if s in split_dirs}
            carved = [s for s in ("val", "test") if s not in splits]
            if carved:
                self._warn_if_grouped(train)
                fr = [0.15] * len(carved)
                parts = carve(train, [1 - sum(fr), *fr])
                for s, p in zip(carved, parts[1:]):
                    splits[s] = train.subset(p)
                train = train.subset(parts[0])
            splits["train"] = train
            self.protocol = "split folders" + (f"; {', '.join(carved)} carved from train by {self._split_unit()}"
                                               if carved else "")
            if self.group_pattern is not None:
                for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
                    both = set(splits[a].groups) & set(splits[b].groups)
                    if both:
                        log.warning("%s: %d patient(s) have images in both %s and %s, e.g. %s", self.root,
                                    len(both), a, b, sorted(both)[0])
        empty = [s for s in SPLITS if len(splits[s]) == 0]
        if empty:
            raise DatasetLayoutError(f"{self.root}: split(s) {empty} have no images (too few images per class)")
        return splits

    def _warn_if_grouped(self, split: Split) -> None:
        if self.group_pattern is not None or not len(split):
            return
        grouped = [p.name for p in split.items if self.LOOKS_GROUPED.match(p.name)]
        if len(grouped) >= max(2, len(split) // 4):
            log.warning("%s: %d of %d file names look grouped by patient (e.g. %s); splitting by image can put "
                        "one patient's images in train and val/test. Set group_pattern (e.g. '^(person\\d+)_') "
                        "to split by patient", self.root, len(grouped), len(split), grouped[0])

    def load(self, item, augment=None):
        return self._image_input(item, augment)


# --------------------------------------------------------------------------- lung masks


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
        for p in _image_files(folder):
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


# --------------------------------------------------------------------------- Decathlon


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


DATASETS = {
    "medmnist": MedMNISTDataModule,
    "chestxray14": ChestXray14DataModule,
    "chexpert": CheXpertDataModule,
    "imagefolder": ImageFolderDataModule,
    "lungmask": LungMaskDataModule,
    "decathlon": DecathlonDataModule,
}
