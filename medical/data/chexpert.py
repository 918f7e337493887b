"""CheXpert: train.csv / valid.csv with its uncertainty labels, patient-grouped splits."""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.data import split_by_group

from .base import DatasetLayoutError, MedicalDataModule, Split, read_csv

log = logging.getLogger(__name__)


CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices"]
# The five observations of the CheXpert competition, which the literature reports.
CHEXPERT_COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


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
    default_imaging = {"modality": "CR/DX", "body_part": "CHEST"}
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
