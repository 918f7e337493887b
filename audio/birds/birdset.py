"""BirdSet data: train on focal recordings, test multi-label on 5 s soundscape windows.

Two on-disk layouts, chosen by `layout` ("auto" looks at the folder):

- "hf": a Hugging Face `datasets.DatasetDict` written with `save_to_disk` (BirdSet as published:
  `DBD-research-group/BirdSet`, config HSN / NBP / ... ). Columns read: `filepath`, `ebird_code`
  (train, one class per focal recording), `detected_events` (train, [[start, end], ...] seconds),
  `ebird_code_multilabel` (test, the classes in the window), `start_time`, `end_time` (test
  window). Class codes come from the `ebird_code` ClassLabel names. Splits: `train` and `test_5s`.
- "csv": a folder of your own recordings with `train.csv` (filepath, ebird_code[, detected_events
  as "s-e;s-e" seconds]) and `test.csv` (filepath, start_time, end_time, ebird_code_multilabel as
  ";"-separated codes, empty for no bird); optional `classes.txt` (one code a line, the output
  order), else the sorted codes of train.csv. Paths are relative to the folder.

Focal recordings give one 5 s window centred on their first detected event; test windows are read
as given. A test code missing from the classes, an unreadable / silent / non-finite file or a
window outside its recording raises one error naming the file.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from audio.birds.frontend import BirdFbankConfig, clip_features, event_window, frontend_config, read_clip
from audio.features import AudioError

# the eight BirdSet test sets and their class counts (Rauch et al. 2025; BirdSet)
TASKS = {"HSN": 21, "NBP": 51, "NES": 89, "PER": 132, "POW": 48, "SNE": 56, "SSW": 81, "UHH": 27}


class DataNotFound(FileNotFoundError, ValueError):
    """A data file or folder is missing (a ValueError too, so the CLIs print it as one line)."""


@dataclass(frozen=True)
class Item:
    path: str
    start: float | None  # None: a focal recording, cropped around its first event
    end: float | None
    labels: tuple[int, ...]
    events: tuple[tuple[float, float], ...] = ()


class WindowDataset(torch.utils.data.Dataset):
    """(features, multi-hot target (C,)) per item: features (1, frames, mels) with Bird-MAE's fbank,
    (mels, frames) with Whisper's log-mel (`cfg.compute`)."""

    def __init__(self, items: list[Item], num_classes: int, cfg: BirdFbankConfig = BirdFbankConfig()):
        self.items, self.num_classes, self.cfg = items, num_classes, cfg

    def __len__(self) -> int:
        return len(self.items)

    def target(self, i: int) -> torch.Tensor:
        y = torch.zeros(self.num_classes)
        y[list(self.items[i].labels)] = 1.0
        return y

    def __getitem__(self, i: int):
        it = self.items[i]
        if it.start is None:  # focal: centre a window on the first detected event
            wave = read_clip(it.path, sample_rate=self.cfg.sample_rate)
            s, e = event_window(it.events, wave.numel() / self.cfg.sample_rate, self.cfg.window_s)
            sr = self.cfg.sample_rate
            x = self.cfg.compute(wave[int(s * sr):int(e * sr)], source=it.path)
        else:
            x = clip_features(it.path, it.start, it.end, self.cfg)
        return x, self.target(i)


def _events(value) -> tuple[tuple[float, float], ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        pairs = [p.split("-") for p in value.split(";") if p.strip()]
        return tuple((float(a), float(b)) for a, b in pairs)
    return tuple((float(a), float(b)) for a, b in value)


def _resolve(root: Path, p: str) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else root / q)


def read_csv_layout(root: Path, classes: list[str] | None = None):
    """(classes, train items, test items) from train.csv / test.csv (/ classes.txt)."""
    def rows(name: str, needed: tuple[str, ...]):
        f = root / name
        if not f.is_file():
            raise DataNotFound(f"{f}: missing (the csv layout needs train.csv and test.csv)")
        with open(f, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{f}: missing column(s) {missing}; has {reader.fieldnames}")
            return f, list(reader)

    ftrain, train_rows = rows("train.csv", ("filepath", "ebird_code"))
    ftest, test_rows = rows("test.csv", ("filepath", "start_time", "end_time", "ebird_code_multilabel"))
    if classes is None and (root / "classes.txt").is_file():
        classes = [c.strip() for c in (root / "classes.txt").read_text().splitlines() if c.strip()]
    if classes is None:
        classes = sorted({r["ebird_code"].strip() for r in train_rows})
    index = {c: i for i, c in enumerate(classes)}

    def code(c: str, f: Path, line: int) -> int:
        if c not in index:
            raise ValueError(f"{f}, line {line}: unknown eBird code {c!r} (known: {', '.join(classes[:10])}"
                             f"{' ...' if len(classes) > 10 else ''})")
        return index[c]

    train = [Item(_resolve(root, r["filepath"]), None, None, (code(r["ebird_code"].strip(), ftrain, n + 2),),
                  _events(r.get("detected_events"))) for n, r in enumerate(train_rows)]
    test = []
    for n, r in enumerate(test_rows):
        labels = tuple(sorted({code(c.strip(), ftest, n + 2) for c in r["ebird_code_multilabel"].split(";") if c.strip()}))
        test.append(Item(_resolve(root, r["filepath"]), float(r["start_time"]), float(r["end_time"]), labels))
    return classes, train, test


def read_hf_layout(root: Path, train_split: str = "train", test_split: str = "test_5s"):
    """(classes, train items, test items) from a `save_to_disk` DatasetDict in BirdSet's columns."""
    try:
        from datasets import load_from_disk
    except ImportError:
        raise ImportError("the BirdSet hf layout needs the `datasets` package: pip install datasets") from None
    dd = load_from_disk(str(root))
    for split in (train_split, test_split):
        if split not in dd:
            raise ValueError(f"{root}: no split {split!r} in the saved dataset (has {list(dd)})")
    tr, te = dd[train_split], dd[test_split]
    feat = tr.features.get("ebird_code")
    classes = list(feat.names) if hasattr(feat, "names") else sorted(set(tr["ebird_code"]))
    index = {c: i for i, c in enumerate(classes)}

    def as_index(v, where: str) -> int:
        if isinstance(v, (int, np.integer)):
            if not 0 <= int(v) < len(classes):
                raise ValueError(f"{where}: class index {v} outside the {len(classes)} classes")
            return int(v)
        if v not in index:
            raise ValueError(f"{where}: unknown eBird code {v!r}")
        return index[v]

    cols = [c for c in ("filepath", "ebird_code", "detected_events") if c in tr.column_names]
    train = []
    for n, r in enumerate(tr.select_columns(cols)):
        path = _resolve(root, r["filepath"])
        train.append(Item(path, None, None, (as_index(r["ebird_code"], f"{path} ({train_split} row {n})"),),
                          _events(r.get("detected_events"))))
    test = []
    for n, r in enumerate(te.select_columns(["filepath", "start_time", "end_time", "ebird_code_multilabel"])):
        path = _resolve(root, r["filepath"])
        labels = tuple(sorted({as_index(v, f"{path} ({test_split} row {n})") for v in r["ebird_code_multilabel"] or []}))
        test.append(Item(path, float(r["start_time"]), float(r["end_time"]), labels))
    return classes, train, test


class BirdSetDataModule(L.LightningDataModule):
    """Focal train windows + multi-label 5 s test windows (see the module docstring for layouts).

    `task` (HSN, NBP, ...) checks the class count against BirdSet's; `few_shot` keeps k focal
    recordings per class (seeded). `pad`: how a clip shorter than the 5 s window is filled
    (`BirdFbankConfig.pad`): "waveform" (zeros, Bird-MAE) or "fbank_min" (the former convention)."""

    multilabel = True

    def __init__(self, root: str, layout: str = "auto", task: str | None = None, train_split: str = "train",
                 test_split: str = "test_5s", few_shot: int | None = None, seed: int = 0, batch_size: int = 32,
                 num_workers: int = 0, classes: list[str] | None = None, val_fraction: float = 0.0,
                 pad: str = "waveform", frontend: str = "birdmae", target_frames: int | None = None):
        super().__init__()
        if layout not in ("auto", "hf", "csv"):
            raise ValueError(f"layout must be auto, hf or csv, got {layout!r}")
        if task is not None and task.upper() not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
        self.root, self.layout, self.task = Path(root).expanduser(), layout, task.upper() if task else None
        self.train_split, self.test_split, self.few_shot, self.seed = train_split, test_split, few_shot, seed
        self.batch_size, self.num_workers, self.classes = batch_size, num_workers, classes
        self.cfg = frontend_config(frontend, pad, target_frames)
        self.name = self.task or self.root.name
        self.val_fraction = val_fraction
        self.splits: dict[str, WindowDataset] = {}
        self._index_cache = None

    def prepare(self) -> None:
        """Hook for modules that write their data first (the demo, the FSDD mixer)."""

    def _index(self):
        """(classes, train items, test items), read once (cheap: the csv / arrow index, no audio)."""
        if self._index_cache is None:
            self.prepare()
            if self.resolved_layout() == "hf":
                classes, train, test = read_hf_layout(self.root, self.train_split, self.test_split)
            else:
                classes, train, test = read_csv_layout(self.root, self.classes)
            if self.task and len(classes) != TASKS[self.task]:
                raise ValueError(f"{self.root}: {len(classes)} classes, but BirdSet {self.task} has {TASKS[self.task]}")
            if not train or not test:
                raise ValueError(f"{self.root}: empty {'train' if not train else 'test'} split")
            self._index_cache = (list(classes), train, test)
        return self._index_cache

    @property
    def labels(self) -> list[str]:
        return self._index()[0]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def preprocessing(self) -> dict:
        return self.cfg.to_dict()

    def resolved_layout(self) -> str:
        if self.layout != "auto":
            return self.layout
        if (self.root / "dataset_dict.json").is_file():
            return "hf"
        if (self.root / "train.csv").is_file():
            return "csv"
        raise DataNotFound(f"{self.root}: neither a save_to_disk DatasetDict (dataset_dict.json) nor the csv "
                                f"layout (train.csv + test.csv)")

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        classes, train, test = self._index()
        if self.few_shot:
            from shared.data import few_shot_indices

            y = np.array([it.labels[0] for it in train])
            train = [train[i] for i in few_shot_indices(y, self.few_shot, self.seed, label_names=classes)]
        val = []
        if self.val_fraction:  # held-out focal recordings, for recipes that pick a checkpoint (audio.train)
            order = np.random.default_rng(self.seed).permutation(len(train))
            n_val = max(1, round(self.val_fraction * len(train)))
            val, train = [train[i] for i in sorted(order[:n_val])], [train[i] for i in sorted(order[n_val:])]
        self.splits = {"train": WindowDataset(train, self.num_classes, self.cfg),
                       "test": WindowDataset(test, self.num_classes, self.cfg)}
        if val:
            self.splits["val"] = WindowDataset(val, self.num_classes, self.cfg)

    def _loader(self, split: str, shuffle: bool = False):
        return torch.utils.data.DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                                           num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def feature_loader(self, split: str):
        """Deterministic order, for feature extraction."""
        return self._loader(split)

    def val_dataloader(self):
        if "val" not in self.splits:
            raise ValueError("no validation split: set --data.val_fraction (e.g. 0.1) to hold out focal recordings")
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    @property
    def metric_definition(self) -> str:
        """`test/cmap`, `test/top1`, `test/auroc` follow BirdSet's metric code (`test_metrics`)."""
        return "reference"

    def test_metrics(self, module) -> dict[str, float]:
        """BirdSet's test metrics (`audio.birds.metrics`: cmAP, T1-Acc, macro AUROC) of a trained
        classifier (`module(x)` -> logits) over the test windows; `audio.train` adds them to
        metrics.json beside the generic module's `test/map`."""
        from audio.birds.metrics import bird_scores

        was_training = module.training
        module.eval()
        device = next(module.parameters()).device
        logits, targets = [], []
        with torch.inference_mode():
            for x, y in self.test_dataloader():
                logits.append(module(x.to(device)).float().cpu())
                targets.append(y)
        module.train(was_training)
        return bird_scores(torch.cat(logits), torch.cat(targets).long())

    def describe(self) -> str:
        tr, te = self.splits["train"], self.splits["test"]
        pos = sum(len(it.labels) > 0 for it in te.items)
        return (f"{self.name}: {self.num_classes} classes, {len(tr)} focal train windows, {len(te)} test windows "
                f"({pos} with at least one call)")


def write_csv_layout(root: Path, train_rows: list[dict], test_rows: list[dict], classes: list[str]) -> None:
    """Write train.csv / test.csv / classes.txt (the csv files last, atomically)."""
    from shared.fs import atomic_write

    atomic_write(root / "classes.txt", "\n".join(classes) + "\n")
    for name, rows, cols in (("train.csv", train_rows, ["filepath", "ebird_code", "detected_events"]),
                             ("test.csv", test_rows, ["filepath", "start_time", "end_time", "ebird_code_multilabel"])):
        lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
        atomic_write(root / name, "\n".join(lines) + "\n")


__all__ = ["TASKS", "Item", "WindowDataset", "BirdSetDataModule", "read_csv_layout", "read_hf_layout",
           "write_csv_layout", "AudioError"]
