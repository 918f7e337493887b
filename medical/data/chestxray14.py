"""NIH ChestX-ray14: the official CSV and split lists, PNGs in the archive layout."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from shared.data import split_by_group

from .base import DatasetLayoutError, MedicalDataModule, Split, read_csv, read_list

log = logging.getLogger(__name__)


CXR14_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


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
    default_imaging = {"modality": "CR/DX", "body_part": "CHEST"}
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
