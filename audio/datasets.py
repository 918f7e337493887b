"""Lightning data modules for ESC-50, UrbanSound8K, Speech Commands v2 and Fluent Speech Commands.

Each reads its dataset's official on-disk layout (never the network), turns clips into AST
fbank features (cached on disk after the first decode) and applies SpecAugment to training
batches where PETL-AST does (ESC-50, UrbanSound8K). Few-shot variants keep k clips per class
of the training split (seeded). Labels are known right after construction, so the CLI can
link `data.num_classes` / `data.labels` into the model.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from shared.data import few_shot_indices

from .features import TARGET_FRAMES, AudioError, FbankCache, FbankConfig, SpecAugment

log = logging.getLogger(__name__)
Item = tuple[Path, int]


class DatasetLayoutError(ValueError):
    """The dataset folder does not have the expected layout; the message names the file or field."""


def read_csv(path: Path, required: list[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: metadata file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetLayoutError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        return list(reader)


class ClipDataset(Dataset):
    def __init__(self, items: list[Item], frontend, augment: torch.nn.Module | None = None):
        self.items, self.frontend, self.augment = items, frontend, augment

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        x = self.frontend(path)  # (T, F)
        if self.augment is not None:
            x = self.augment(x)
        return x, label


class AudioDataModule(L.LightningDataModule):
    """Shared machinery; subclasses say where the clips and labels are (`read_splits`)."""

    name: ClassVar[str] = "audio"
    augment_by_default: ClassVar[bool] = False

    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 0, target_frames: int | None = None,
                 specaugment: bool | None = None, freq_mask: int = 24, time_mask: int = 80,
                 cache_dir: str | None = None, few_shot: int | None = None, seed: int = 0,
                 skip_bad_files: bool = False):
        super().__init__()
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetLayoutError(f"{self.root}: dataset folder not found")
        self.batch_size, self.num_workers, self.seed, self.few_shot = batch_size, num_workers, seed, few_shot
        self.fbank = FbankConfig(target_frames=target_frames or TARGET_FRAMES[self.name])
        use_aug = self.augment_by_default if specaugment is None else specaugment
        self.augment = SpecAugment(freq_mask, time_mask) if use_aug else None
        self.cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "peft-suite" / "fbank"
        self.skip_bad_files = skip_bad_files
        self.labels: list[str] = []
        self.splits: dict[str, list[Item]] = self.read_splits()  # also fills self.labels
        if few_shot:
            train = self.splits["train"]
            keep = few_shot_indices([y for _, y in train], few_shot, seed=seed, label_names=self.labels)
            self.splits["train"] = [train[i] for i in keep]
        self.skipped: dict[str, int] = {}  # unusable files skipped per split (skip_bad_files)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def preprocessing(self) -> dict:
        return self.fbank.to_dict()

    def read_splits(self) -> dict[str, list[Item]]:
        raise TypeError(f"{type(self).__name__} must define read_splits()")

    def setup(self, stage: str | None = None):
        self.frontend = FbankCache(self.cache_dir, self.fbank)
        if self.skip_bad_files and not self.skipped:  # Lightning calls setup again for test: filter once
            for split, items in self.splits.items():
                good = []
                for path, y in items:
                    try:
                        self.frontend(path)
                        good.append((path, y))
                    except AudioError as e:
                        log.warning("skipping %s", e)
                self.skipped[split] = len(items) - len(good)
                self.splits[split] = good
            if any(self.skipped.values()):
                log.warning("skipped unusable audio files per split: %s", self.skipped)

    def _loader(self, split: str, train: bool = False):
        ds = ClipDataset(self.splits[split], self.frontend, self.augment if train else None)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=train, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


def _check_fold(name: str, fold: int, n: int, what: str = "fold") -> None:
    if not 1 <= fold <= n:
        raise DatasetLayoutError(f"{name}: {what} {fold} does not exist (folds are 1..{n})")


class ESC50DataModule(AudioDataModule):
    """ESC-50: `meta/esc50.csv` + `audio/*.wav`; 5 folds rotated 3 train / 1 val / 1 test.

    `test_fold` (1-5) is held out; `val_fold` defaults to the next fold (5 -> 1).
    """

    name = "esc50"
    augment_by_default = True

    def __init__(self, root: str, test_fold: int = 1, val_fold: int | None = None, **kw):
        self.test_fold, self.val_fold = test_fold, val_fold or test_fold % 5 + 1
        super().__init__(root, **kw)

    def read_splits(self):
        _check_fold("ESC-50", self.test_fold, 5, "test_fold")
        _check_fold("ESC-50", self.val_fold, 5, "val_fold")
        if self.val_fold == self.test_fold:
            raise DatasetLayoutError("ESC-50: val_fold must differ from test_fold")
        meta = self.root / "meta" / "esc50.csv"
        rows = read_csv(meta, ["filename", "fold", "target", "category"])
        names = {}
        for r in rows:
            names[int(r["target"])] = r["category"]
        self.labels = [names[i] for i in sorted(names)]
        splits = {"train": [], "val": [], "test": []}
        for r in rows:
            fold = int(r["fold"])
            split = "test" if fold == self.test_fold else "val" if fold == self.val_fold else "train"
            splits[split].append((self.root / "audio" / r["filename"], int(r["target"])))
        return splits


class UrbanSound8KDataModule(AudioDataModule):
    """UrbanSound8K: `metadata/UrbanSound8K.csv` + `audio/fold<k>/`; 10 folds.

    Validation uses its own fold (default: the next one), never the test fold (the anchor
    validates on its test fold).
    """

    name = "us8k"
    augment_by_default = True

    def __init__(self, root: str, test_fold: int = 1, val_fold: int | None = None, **kw):
        self.test_fold, self.val_fold = test_fold, val_fold or test_fold % 10 + 1
        super().__init__(root, **kw)

    def read_splits(self):
        _check_fold("UrbanSound8K", self.test_fold, 10, "test_fold")
        _check_fold("UrbanSound8K", self.val_fold, 10, "val_fold")
        if self.val_fold == self.test_fold:
            raise DatasetLayoutError("UrbanSound8K: val_fold must differ from test_fold")
        meta = self.root / "metadata" / "UrbanSound8K.csv"
        rows = read_csv(meta, ["slice_file_name", "fold", "classID", "class"])
        names = {int(r["classID"]): r["class"] for r in rows}
        self.labels = [names[i] for i in sorted(names)]
        splits = {"train": [], "val": [], "test": []}
        for r in rows:
            fold = int(r["fold"])
            split = "test" if fold == self.test_fold else "val" if fold == self.val_fold else "train"
            splits[split].append((self.root / "audio" / f"fold{fold}" / r["slice_file_name"], int(r["classID"])))
        return splits


class SpeechCommandsDataModule(AudioDataModule):
    """Speech Commands v2: one folder per word, `validation_list.txt`, `testing_list.txt`.

    Every word folder is a class (35 in v2); `_background_noise_` is not a class.
    """

    name = "speech_commands"

    def read_splits(self):
        lists = {}
        for split, fname in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
            p = self.root / fname
            if not p.is_file():
                raise DatasetLayoutError(f"{p}: official split list not found")
            lists[split] = {line.strip() for line in p.read_text().splitlines() if line.strip()}
        words = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
        if not words:
            raise DatasetLayoutError(f"{self.root}: no word folders found")
        self.labels = words
        splits = {"train": [], "val": [], "test": []}
        for y, word in enumerate(words):
            for wav in sorted((self.root / word).glob("*.wav")):
                rel = f"{word}/{wav.name}"
                split = "val" if rel in lists["val"] else "test" if rel in lists["test"] else "train"
                splits[split].append((wav, y))
        known = {f"{w}/{p.name}" for w in words for p in (self.root / w).glob("*.wav")}
        for split, names in lists.items():
            missing = sorted(names - known)
            if missing:
                raise DatasetLayoutError(f"{self.root}: {len(missing)} file(s) in the {split} list do not exist, "
                                         f"e.g. {missing[0]}")
        return splits


class FluentSpeechCommandsDataModule(AudioDataModule):
    """Fluent Speech Commands: `data/{train,valid,test}_data.csv` + `wavs/speakers/...`.

    The intent (action, object, location) is the class: 31 in the official data.
    """

    name = "fsc"

    def read_splits(self):
        cols = ["path", "action", "object", "location"]
        rows = {s: read_csv(self.root / "data" / f"{f}_data.csv", cols)
                for s, f in (("train", "train"), ("val", "valid"), ("test", "test"))}
        intent = lambda r: f"{r['action']}|{r['object']}|{r['location']}"  # noqa: E731
        self.labels = sorted({intent(r) for r in rows["train"]})
        index = {name: i for i, name in enumerate(self.labels)}
        splits = {}
        for split, rs in rows.items():
            unknown = sorted({intent(r) for r in rs} - set(index))
            if unknown:
                raise DatasetLayoutError(f"{self.root / 'data'}: {split} split has intents absent from train: {unknown[:3]}")
            splits[split] = [(self.root / r["path"], index[intent(r)]) for r in rs]
        return splits


DATASETS = {"esc50": ESC50DataModule, "us8k": UrbanSound8KDataModule,
            "speech_commands": SpeechCommandsDataModule, "fsc": FluentSpeechCommandsDataModule}
