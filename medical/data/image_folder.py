"""Image folders: one subfolder per class, with or without train / val / test folders."""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shared.data import split_by_group

from ..io import SUPPORTED_EXTENSIONS
from .base import (
    SPLITS,
    DatasetLayoutError,
    MedicalDataModule,
    Split,
    image_files,
    stratified_split,
)

log = logging.getLogger(__name__)


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
                files = image_files(d)
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
