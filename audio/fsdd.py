"""The Free Spoken Digit Dataset (FSDD): real speech, offline, 10 classes.

FSDD (CC BY-SA 4.0, Jakobovski et al.) ships as `recordings/{digit}_{speaker}_{take}.wav`
(8 kHz mono, 6 speakers x 10 digits x 50 takes in release 1.0.10). Two ways to use it:

- `FSDDDataModule` (recipe `domains/audio/data/fsdd.yaml`) reads the `recordings/` folder as is.
  Its default test split is **speaker-disjoint**: whole speakers are held out for test
  (`test_speakers`, default `theo`) and validation (`val_speakers`, default `nicolas`), so the
  test accuracy says how the model does on a voice it never heard. `split: take` is FSDD's own
  split instead (takes 0-4 of every speaker test, 5-9 validate, the rest train), where test
  speakers are also training speakers.
- `write_speech_commands_layout` links a subset into the Speech Commands v2 layout (word folders
  `zero` ... `nine` + `validation_list.txt` / `testing_list.txt`), so `SpeechCommandsDataModule`
  reads it as is; same two splits.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

from audio.datasets import AudioDataModule, DatasetLayoutError

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
SPLITS = ("speaker", "take")
TEST_SPEAKERS = ("theo",)
VAL_SPEAKERS = ("nicolas",)
MANIFEST = "fsdd_layout.json"


def recordings(fsdd: str | os.PathLike) -> list[tuple[Path, int, str, int]]:
    """[(wav, digit, speaker, take)] of `fsdd/recordings` (or `fsdd` itself when it holds the wavs)."""
    fsdd = Path(fsdd).expanduser()
    src = fsdd / "recordings" if (fsdd / "recordings").is_dir() else fsdd
    if not src.is_dir():
        raise DatasetLayoutError(f"{fsdd}: FSDD folder not found (expected {fsdd / 'recordings'})")
    out = []
    for wav in sorted(src.glob("*.wav")):
        m = NAME.match(wav.name)
        if m:
            out.append((wav, int(m[1]), m[2], int(m[3])))
    if not out:
        raise DatasetLayoutError(f"{src}: no FSDD recordings (<digit>_<speaker>_<take>.wav) found")
    return out


def loso_folds(speakers) -> list[tuple[str, str]]:
    """Leave-one-speaker-out: [(test speaker, validation speaker)], one fold per speaker in sorted
    order; validation is the next speaker in that order (cyclically), training the rest. Every
    speaker is tested once and validates once."""
    s = sorted(set(speakers))
    if len(s) < 3:
        raise ValueError(f"leave-one-speaker-out needs at least 3 speakers (test, validation, training), got {s}")
    return [(s[i], s[(i + 1) % len(s)]) for i in range(len(s))]


def take_subset(recs, n: int | None, seed: int) -> set[tuple[str, int, int]]:
    """{(speaker, digit, take)} of n takes drawn per (speaker, digit) from `recs`, seeded by (seed,
    speaker, digit) alone: a speaker keeps the same takes in every fold. All when n is None."""
    by: dict[tuple[str, int], list[int]] = {}
    for _, digit, speaker, take in recs:
        by.setdefault((speaker, digit), []).append(take)
    out = set()
    for (speaker, digit), takes in by.items():
        takes = sorted(takes)
        if n is not None and n < len(takes):
            takes = random.Random(f"{seed}:{speaker}:{digit}").sample(takes, n)
        out.update((speaker, digit, t) for t in takes)
    return out


def assign(speaker: str, take: int, split: str, test_speakers, val_speakers, val_below_take: int = 0) -> str:
    """"train" / "val" / "test" for one recording under the chosen split (speaker split: takes <
    `val_below_take` of the non-test speakers validate too)."""
    if split == "take":
        return "test" if take < 5 else "val" if take < 10 else "train"
    if speaker in test_speakers:
        return "test"
    return "val" if speaker in val_speakers or take < val_below_take else "train"


def _check(split: str, test_speakers, val_speakers, speakers_present: set[str], where: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {SPLITS}, got {split!r}")
    if split == "speaker":
        unknown = sorted((set(test_speakers) | set(val_speakers)) - speakers_present)
        if unknown:
            raise ValueError(f"{where}: speakers {unknown} are not in the data (speakers: {sorted(speakers_present)})")
        both = sorted(set(test_speakers) & set(val_speakers))
        if both:
            raise ValueError(f"{where}: speakers {both} are both test and validation speakers")


class FSDDDataModule(AudioDataModule):
    """FSDD spoken digits from `root/recordings` (module docstring). Labels are `zero` ... `nine`.

    Args (beyond AudioDataModule's): split: "speaker" (default: held-out speakers) or "take"
    (FSDD's official takes 0-4 test); test_speakers / val_speakers: the held-out speakers of the
    speaker split; speakers: keep only these speakers (all when None); max_take: keep takes < max_take;
    train_takes / val_takes / test_takes: keep that many takes per (speaker, digit) in the split,
    drawn with `seed` (`take_subset`; None keeps all); val_below_take: takes < this of the
    non-test speakers validate too (with `val_speakers: []` every other speaker trains, on its
    later takes; the catalogue recipe's split).
    """

    name = "fsdd"

    def __init__(self, root: str, split: str = "speaker", test_speakers: list[str] | None = None,
                 val_speakers: list[str] | None = None, speakers: list[str] | None = None, max_take: int = 50,
                 train_takes: int | None = None, val_takes: int | None = None, test_takes: int | None = None,
                 val_below_take: int = 0, **kw):
        if isinstance(val_below_take, bool) or not isinstance(val_below_take, int) or val_below_take < 0:
            raise ValueError(f"FSDD: data.init_args.val_below_take must be an integer >= 0, got {val_below_take!r}")
        if val_below_take and split != "speaker":
            raise ValueError("FSDD: data.init_args.val_below_take is for split 'speaker' (split 'take' validates "
                             "on takes 5-9)")
        self.split, self.val_below_take = split, val_below_take
        self.test_speakers = list(test_speakers if test_speakers is not None else TEST_SPEAKERS)
        self.val_speakers = list(val_speakers if val_speakers is not None else VAL_SPEAKERS)
        self.speakers, self.max_take = (list(speakers) if speakers else None), max_take
        self.takes = {"train": train_takes, "val": val_takes, "test": test_takes}
        for part, n in self.takes.items():
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"FSDD: data.init_args.{part}_takes must be a positive integer or null, got {n!r}")
        if split == "speaker":
            # the same text in every fold (the report averages folds of one protocol); the fold is the test speakers
            self.protocol = (f"speaker-disjoint ({len(self.test_speakers)} test, "
                             f"{len(self.val_speakers)} validation speaker{'s' if len(self.val_speakers) > 1 else ''})")
            self.test_fold = ",".join(self.test_speakers)
        else:
            self.protocol = "FSDD takes (0-4 test, 5-9 val)"
        super().__init__(root, **kw)

    def read_splits(self):
        recs = [r for r in recordings(self.root)
                if (not self.speakers or r[2] in self.speakers) and r[3] < self.max_take]
        _check(self.split, self.test_speakers, self.val_speakers, {r[2] for r in recs}, f"{self.root} (FSDD)")
        self.labels = list(WORDS)
        splits = {"train": [], "val": [], "test": []}
        keep = {part: take_subset(recs, n, self.seed) for part, n in self.takes.items() if n is not None}
        for wav, digit, speaker, take in recs:
            part = assign(speaker, take, self.split, self.test_speakers, self.val_speakers, self.val_below_take)
            if part not in keep or (speaker, digit, take) in keep[part]:
                splits[part].append((wav, digit))
        empty = [s for s, items in splits.items() if not items]
        if empty:
            raise DatasetLayoutError(f"{self.root}: the {self.split} split leaves {empty} empty "
                                     f"(speakers {sorted({r[2] for r in recs})}, takes < {self.max_take})")
        return splits


def write_speech_commands_layout(fsdd: str | os.PathLike, root: str | os.PathLike,
                                 speakers: list[str] | None = None, max_take: int = 50, split: str = "speaker",
                                 test_speakers: list[str] | None = None,
                                 val_speakers: list[str] | None = None) -> Path:
    """Link FSDD recordings into `root` in the Speech Commands layout. Returns `root`.

    Idempotent for the same settings (recorded in `root/fsdd_layout.json`); a layout written with
    other settings (speakers, takes, split) is rewritten, never silently reused; a folder holding
    anything not written by this function is refused.
    """
    root = Path(root)
    recs = [r for r in recordings(fsdd) if (not speakers or r[2] in speakers) and r[3] < max_take]
    test_speakers = list(test_speakers if test_speakers is not None else TEST_SPEAKERS)
    val_speakers = list(val_speakers if val_speakers is not None else VAL_SPEAKERS)
    if split == "speaker" and speakers:  # held-out speakers default to those kept
        present = {r[2] for r in recs}
        test_speakers = [s for s in test_speakers if s in present] or sorted(present)[-1:]
        val_speakers = [s for s in val_speakers if s in present and s not in test_speakers] or \
            [s for s in sorted(present) if s not in test_speakers][-1:]
    _check(split, test_speakers, val_speakers, {r[2] for r in recs}, f"{fsdd}")
    settings = {"fsdd": str(Path(fsdd).resolve()), "speakers": sorted(speakers) if speakers else None,
                "max_take": max_take, "split": split,
                "test_speakers": sorted(test_speakers) if split == "speaker" else None,
                "val_speakers": sorted(val_speakers) if split == "speaker" else None}
    manifest = root / MANIFEST
    if (root / "testing_list.txt").is_file() and manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == settings:
                return root
        except json.JSONDecodeError:
            pass
        _clear_layout(root)  # ours, written with other settings: rewrite it
    elif root.is_dir() and any(root.iterdir()):
        raise ValueError(f"{root}: not empty and not an FSDD layout written by write_speech_commands_layout "
                         f"(no {MANIFEST}); give a new or empty folder")
    lists = {"val": [], "test": []}
    for wav, digit, speaker, take in recs:
        word = WORDS[digit]
        (root / word).mkdir(parents=True, exist_ok=True)
        dst = root / word / wav.name
        if not dst.exists():
            os.symlink(wav.resolve(), dst)
        part = assign(speaker, take, split, test_speakers, val_speakers)
        if part != "train":
            lists[part].append(f"{word}/{wav.name}")
    (root / "validation_list.txt").write_text("\n".join(lists["val"]) + "\n")
    (root / MANIFEST).write_text(json.dumps(settings, indent=2))
    (root / "testing_list.txt").write_text("\n".join(lists["test"]) + "\n")  # written last: marks completion
    return root


def _clear_layout(root: Path) -> None:
    """Remove what write_speech_commands_layout wrote (its lists, manifest and word folders of links)."""
    (root / "testing_list.txt").unlink(missing_ok=True)  # first: a torn clear is never taken as complete
    for word in WORDS:
        d = root / word
        if d.is_dir():
            if any(not (p.is_symlink() or not p.exists()) for p in d.iterdir()):
                raise ValueError(f"{d}: holds files that are not FSDD links; not rewriting this layout")
            shutil.rmtree(d)
    for name in ("validation_list.txt", MANIFEST):
        (root / name).unlink(missing_ok=True)
