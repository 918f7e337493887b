"""Lightning data modules for ESC-50, UrbanSound8K, Speech Commands v2 and Fluent Speech Commands.

Each reads its dataset's official on-disk layout (never the network), turns clips into AST
fbank features (cached on disk after the first decode) and applies SpecAugment to training
batches where PETL-AST does (ESC-50, UrbanSound8K; its main.py turns it off for Speech Commands
and Fluent Speech Commands since commit c80097e "Fixed specaugmentation"). Few-shot variants
keep k clips per class of the training split (seeded; drawn after unusable files are skipped).
Labels are known right after construction, so the CLI can link `data.num_classes` /
`data.labels` into the model.

ESC-50 and UrbanSound8K offer two evaluation protocols (`protocol`, written to metrics.json):

* ``petl-ast``: PETL-AST's rotation: validation = the fold before the test fold, training = the
  other 3 (ESC-50) / 8 (US8K) folds; the best-validation checkpoint is tested.
* ``official``: the datasets' own protocol, training on all 4 / 9 other folds; validation is
  `val_fraction` of the training folds' source recordings (ESC-50 `src_file`, US8K `fsID`, so
  no recording is in both), or, with ``val_fraction=0``, no validation at all and the LAST epoch
  is tested (metrics.json says ``official-last-epoch``).
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from shared.data import balanced_sampler, few_shot_indices, split_by_group

from .augment import AugmentedFeatures, WaveAugment
from .features import TARGET_FRAMES, AudioError, FbankCache, FbankConfig, SpecAugment

log = logging.getLogger(__name__)
Item = tuple[Path, int]


class DatasetLayoutError(ValueError):
    """The dataset folder does not have the expected layout; the message names the file or field."""


def read_csv(path: Path, required: list[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: metadata file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:  # a byte-order mark is not part of a column name
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
        x = self.frontend(path)  # (T, F); (F, T) with the Whisper frontend
        if self.augment is not None:
            x = self.augment(x)
        return x, label


FRONTENDS = ("ast", "whisper")


def make_frontend(frontend: str, target_frames: int, options: dict | None = None):
    """`frontend: ast` -> AST's kaldi fbank (frames, 128 mel); `whisper` -> Whisper's log-mel (80 mel, frames).
    `options`: more settings of the frontend's config (`data.init_args.frontend_options`; Whisper's
    band_limit_hz / trim_db / peak / min_seconds, see `audio.whisper.WhisperMelConfig`)."""
    options = dict(options or {})
    try:
        if frontend == "ast":
            return FbankConfig(target_frames=target_frames, **options)
        if frontend == "whisper":
            from .whisper import WhisperMelConfig

            return WhisperMelConfig(target_frames=target_frames, **options)
    except TypeError as e:
        raise ValueError(f"data.init_args.frontend_options: {e}") from None
    raise ValueError(f"data.init_args.frontend must be one of {FRONTENDS}, got {frontend!r}")


def frontend_augment(frontend: str, freq_mask: int, time_mask: int) -> torch.nn.Module:
    if frontend == "whisper":
        from .whisper import MelFirstSpecAugment

        return MelFirstSpecAugment(freq_mask, time_mask)
    return SpecAugment(freq_mask, time_mask)


class AudioDataModule(L.LightningDataModule):
    """Shared machinery; subclasses say where the clips and labels are (`read_splits`).

    `frontend` picks the features: "ast" (default: AST's fbank, (target_frames, 128)) or "whisper"
    (Whisper's log-mel, (80, target_frames), for the `whisper` backbones); `frontend_options` sets
    more of its config; `preprocessing` records it. `wave_augment` (`audio.augment.WaveAugment`
    settings) perturbs training waveforms.
    """

    name: ClassVar[str] = "audio"
    augment_by_default: ClassVar[bool] = False
    protocol: str = "official"  # the dataset's own train / validation / test lists

    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 0, target_frames: int | None = None,
                 specaugment: bool | None = None, freq_mask: int = 24, time_mask: int = 80,
                 cache_dir: str | None = None, few_shot: int | None = None, seed: int = 0,
                 skip_bad_files: bool = False, balanced_sampler: bool = False, frontend: str = "ast",
                 frontend_options: dict | None = None, wave_augment: dict | None = None):
        super().__init__()
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetLayoutError(f"{self.root}: dataset folder not found")
        self.batch_size, self.num_workers, self.seed, self.few_shot = batch_size, num_workers, seed, few_shot
        self.fbank = make_frontend(frontend, target_frames or TARGET_FRAMES[self.name], frontend_options)
        # waveform augmentation of training clips (audio.augment): they are then featurised every epoch
        self.wave_augment = WaveAugment(**wave_augment, sample_rate=self.fbank.sample_rate) if wave_augment else None
        use_aug = self.augment_by_default if specaugment is None else specaugment
        self.augment = frontend_augment(frontend, freq_mask, time_mask) if use_aug else None
        self.cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "peft-suite" / "fbank"
        self.skip_bad_files, self.balanced_sampler = skip_bad_files, balanced_sampler
        self.labels: list[str] = []
        self.splits: dict[str, list[Item]] = self.read_splits()  # also fills self.labels
        self.skipped: dict[str, int] = {}  # unusable files skipped per split (skip_bad_files)
        if few_shot and not skip_bad_files:  # else drawn in setup(), from the usable clips only
            self._draw_few_shot()

    def _draw_few_shot(self) -> None:
        train = self.splits["train"]
        keep = few_shot_indices([y for _, y in train], self.few_shot, seed=self.seed, label_names=self.labels)
        self.splits["train"] = [train[i] for i in keep]

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
            if self.few_shot:
                self._draw_few_shot()

    def _loader(self, split: str, train: bool = False):
        frontend = AugmentedFeatures(self.fbank, self.wave_augment) if train and self.wave_augment else self.frontend
        ds = ClipDataset(self.splits[split], frontend, self.augment if train else None)
        # evaluation: sequential; under DDP each process's share comes from Lightning (shared.distributed)
        sampler = balanced_sampler([y for _, y in ds.items], self.seed) if train and self.balanced_sampler else None
        return DataLoader(ds, batch_size=self.batch_size, shuffle=train and sampler is None, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        if not self.splits["val"]:
            return []  # protocol without validation: Lightning skips it, the last epoch is tested
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


def _check_fold(name: str, fold: int, n: int, what: str = "fold") -> None:
    if not 1 <= fold <= n:
        raise DatasetLayoutError(f"{name}: {what} {fold} does not exist (folds are 1..{n})")


PROTOCOLS = ("petl-ast", "official")


class FoldDataModule(AudioDataModule):
    """A dataset with official folds (ESC-50, UrbanSound8K): `test_fold` is held out; `protocol`
    decides validation and training (see the module docstring). `val_fold` (petl-ast only)
    overrides the fold before the test fold; `val_fraction` (official only) is the share of the
    training folds' source recordings held out for validation (0: none, last epoch tested)."""

    n_folds: ClassVar[int] = 5
    title: ClassVar[str] = ""

    def __init__(self, root: str, test_fold: int = 1, val_fold: int | None = None, protocol: str = "petl-ast",
                 val_fraction: float = 0.1, **kw):
        if protocol not in PROTOCOLS:
            raise ValueError(f"{self.title}: protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if protocol == "official" and val_fold is not None:
            raise ValueError(f"{self.title}: val_fold is for protocol 'petl-ast'; the official protocol trains on "
                             f"every fold but the test fold (validation: val_fraction of their recordings)")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"{self.title}: val_fraction must be in [0, 1), got {val_fraction}")
        self.test_fold, self.val_fraction = test_fold, val_fraction
        self.val_fold = (val_fold or (test_fold - 2) % self.n_folds + 1) if protocol == "petl-ast" else None
        self.protocol = protocol if protocol == "petl-ast" or val_fraction else "official-last-epoch"
        super().__init__(root, **kw)

    def read_rows(self) -> list[tuple[int, Path, int, str]]:
        """(fold, path, class id, source recording) per clip; fills self.labels."""
        raise TypeError(f"{type(self).__name__} must define read_rows()")

    def read_splits(self):
        _check_fold(self.title, self.test_fold, self.n_folds, "test_fold")
        if self.val_fold is not None:
            _check_fold(self.title, self.val_fold, self.n_folds, "val_fold")
            if self.val_fold == self.test_fold:
                raise DatasetLayoutError(f"{self.title}: val_fold must differ from test_fold")
        rows = self.read_rows()
        splits = {"train": [], "val": [], "test": []}
        train_groups = []
        for fold, path, y, group in rows:
            if fold == self.test_fold:
                splits["test"].append((path, y))
            elif fold == self.val_fold:
                splits["val"].append((path, y))
            else:
                splits["train"].append((path, y))
                train_groups.append(group)
        if self.protocol == "official":
            try:
                tr, va = split_by_group(train_groups, (1 - self.val_fraction, self.val_fraction), seed=self.seed)
            except ValueError as err:
                raise DatasetLayoutError(f"{self.title}: cannot hold out val_fraction={self.val_fraction} of the "
                                         f"training recordings ({err})") from None
            train = splits["train"]
            splits["train"], splits["val"] = [train[i] for i in tr], [train[i] for i in va]
        return splits


class ESC50DataModule(FoldDataModule):
    """ESC-50: `meta/esc50.csv` + `audio/*.wav`; 5 folds (see `FoldDataModule` for the protocols).

    petl-ast (default): train 3 folds, validate on the fold before `test_fold` (1 -> 5), as
    PETL-AST's main.py; official: train 4 folds (validation: `val_fraction` of their `src_file`s).
    """

    name = "esc50"
    augment_by_default = True
    n_folds, title = 5, "ESC-50"

    def read_rows(self):
        meta = self.root / "meta" / "esc50.csv"
        cols = ["filename", "fold", "target", "category"] + (["src_file"] if self.protocol == "official" else [])
        rows = read_csv(meta, cols)
        self.labels = _label_names(meta, rows, "target", "category")
        return [(_int(meta, r, "fold", i), self.root / "audio" / r["filename"], int(r["target"]),
                 r.get("src_file") or r["filename"]) for i, r in enumerate(rows, start=2)]


class UrbanSound8KDataModule(FoldDataModule):
    """UrbanSound8K: `metadata/UrbanSound8K.csv` + `audio/fold<k>/`; 10 folds (see `FoldDataModule`).

    petl-ast (default): train 8 folds, validate on the fold before `test_fold` (PETL-AST itself
    trains on 9 folds and picks its epoch on the test fold; we never select on the test fold);
    official: train 9 folds (validation: `val_fraction` of their `fsID` recordings).
    """

    name = "us8k"
    augment_by_default = True
    n_folds, title = 10, "UrbanSound8K"

    def read_rows(self):
        meta = self.root / "metadata" / "UrbanSound8K.csv"
        cols = ["slice_file_name", "fold", "classID", "class"] + (["fsID"] if self.protocol == "official" else [])
        rows = read_csv(meta, cols)
        self.labels = _label_names(meta, rows, "classID", "class")
        out = []
        for i, r in enumerate(rows, start=2):
            fold = _int(meta, r, "fold", i)
            out.append((fold, self.root / "audio" / f"fold{fold}" / r["slice_file_name"], int(r["classID"]),
                        r.get("fsID") or r["slice_file_name"]))
        return out


def _int(path: Path, row: dict, column: str, line: int) -> int:
    try:
        return int(row[column])
    except (TypeError, ValueError):
        raise DatasetLayoutError(f"{path}: line {line}: column {column!r} is {row[column]!r}, not an integer") from None


def _label_names(path: Path, rows: list[dict], id_col: str, name_col: str) -> list[str]:
    names: dict[int, str] = {}
    for i, r in enumerate(rows, start=2):
        names[_int(path, r, id_col, i)] = r[name_col]
    if sorted(names) != list(range(len(names))):
        raise DatasetLayoutError(f"{path}: column {id_col!r} must number the classes 0..{len(names) - 1}, "
                                 f"got {sorted(names)[:12]}")
    return [names[i] for i in range(len(names))]


# The word folders of the official releases.
SPEECH_COMMANDS_V1 = ["bed", "bird", "cat", "dog", "down", "eight", "five", "four", "go", "happy", "house", "left",
                      "marvin", "nine", "no", "off", "on", "one", "right", "seven", "sheila", "six", "stop", "three",
                      "tree", "two", "up", "wow", "yes", "zero"]
SPEECH_COMMANDS_WORDS = {"v2": sorted(SPEECH_COMMANDS_V1 + ["backward", "follow", "forward", "learn", "visual"]),
                         "v0.01": SPEECH_COMMANDS_V1}


class SpeechCommandsDataModule(AudioDataModule):
    """Speech Commands: one folder per word, `validation_list.txt`, `testing_list.txt`.

    Every word folder is a class; `_background_noise_` is not a class. `version` checks the word
    folders against the release: "v2" (35 words, PETL-AST's; the recipe sets it), "v0.01" (30),
    or "any" (the default: whatever folders there are, e.g. FSDD digits in this layout). Empty
    word folders are refused.
    """

    name = "speech_commands"

    def __init__(self, root: str, version: str = "any", **kw):
        if version not in ("v2", "v0.01", "any"):
            raise ValueError(f"Speech Commands: version must be v2, v0.01 or any, got {version!r}")
        self.version = version
        super().__init__(root, **kw)

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
        if self.version != "any" and words != SPEECH_COMMANDS_WORDS[self.version]:
            want = SPEECH_COMMANDS_WORDS[self.version]
            missing, extra = sorted(set(want) - set(words)), sorted(set(words) - set(want))
            other = [v for v, ws in SPEECH_COMMANDS_WORDS.items() if ws == words]
            hint = f" (these are the {other[0]} words: set version: {other[0]})" if other else ""
            raise DatasetLayoutError(f"{self.root}: {len(words)} word folders, Speech Commands {self.version} has "
                                     f"{len(want)}: missing {missing}, unexpected {extra}{hint}; "
                                     f"version: any accepts any word set")
        empty = [w for w in words if not any((self.root / w).glob("*.wav"))]
        if empty:
            raise DatasetLayoutError(f"{self.root / empty[0]}: word folder has no .wav files "
                                     f"({len(empty)} empty: {empty[:5]})")
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
