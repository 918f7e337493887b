"""Fixtures for the audio tests: tiny datasets written in each dataset's REAL on-disk layout.

Every writer is deterministic (seeded) and small (a handful of clips of 0.3-0.6 s), so the
whole audio suite stays fast. The layouts follow the official releases:

- ESC-50: `meta/esc50.csv` (filename, fold, target, category, esc10, src_file, take) +
  `audio/<fold>-<src>-<take>-<target>.wav`, 44.1 kHz 16-bit mono.
- UrbanSound8K: `metadata/UrbanSound8K.csv` (slice_file_name, fsID, start, end, salience, fold,
  classID, class) + `audio/fold1..fold10/<fsID>-<classID>-<occ>-<slice>.wav`, mixed sample rates,
  channel counts and bit depths (as the real corpus).
- Speech Commands v2: one folder per word with `<hash>_nohash_<n>.wav` (16 kHz), plus
  `validation_list.txt`, `testing_list.txt`, `_background_noise_/`, `LICENSE`, `README.md`.
- Fluent Speech Commands: `data/{train,valid,test}_data.csv` with an unnamed index column then
  (path, speakerId, transcription, action, object, location) + `wavs/speakers/<id>/<uuid>.wav`.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

FSDD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fsdd"


def tone(seconds: float, sr: int, channels: int = 1, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """A deterministic noisy tone, (T,) for mono or (T, C), amplitude < 0.9."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    cols = []
    for c in range(channels):
        f0 = rng.uniform(200, 2000)
        cols.append(0.5 * np.sin(2 * np.pi * f0 * t + c) + 0.05 * rng.standard_normal(n))
    x = np.stack(cols, axis=1).clip(-0.9, 0.9).astype(dtype)
    return x[:, 0] if channels == 1 else x


def write_wav(path: Path, seconds: float = 0.5, sr: int = 16_000, channels: int = 1,
              subtype: str = "PCM_16", seed: int = 0, fmt: str | None = None) -> np.ndarray:
    """Write a clip and return the samples written (before quantisation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = tone(seconds, sr, channels, seed)
    sf.write(str(path), x, sr, subtype=subtype, format=fmt)
    return x


def corrupt(path: Path) -> None:
    """Overwrite a file with bytes that are not audio (libsndfile cannot open it)."""
    path.write_bytes(np.random.default_rng(1).bytes(2000))


# --------------------------------------------------------------------------- ESC-50

ESC50_COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
ESC50_CATEGORIES = ["dog", "rooster", "rain"]


def make_esc50(root: Path, classes: int = 3, per_fold: int = 2, seconds: float = 0.4,
               columns: list[str] | None = None) -> Path:
    rows = []
    seed = 0
    for fold in range(1, 6):
        for target in range(classes):
            for take in range(per_fold):
                src = 100000 + 1000 * fold + 10 * target + take
                name = f"{fold}-{src}-{'ABCDEFG'[take]}-{target}.wav"
                write_wav(root / "audio" / name, seconds, 44_100, seed=seed)
                seed += 1
                rows.append({"filename": name, "fold": fold, "target": target,
                             "category": ESC50_CATEGORIES[target], "esc10": str(target == 0),
                             "src_file": src, "take": "ABCDEFG"[take]})
    cols = columns or ESC50_COLUMNS
    (root / "meta").mkdir(parents=True, exist_ok=True)
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return root


# --------------------------------------------------------------------------- UrbanSound8K

US8K_COLUMNS = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
US8K_CLASSES = ["air_conditioner", "car_horn", "children_playing"]
# (sample rate, channels, subtype): the real corpus mixes all of these
US8K_FORMATS = [(44_100, 2, "PCM_16"), (48_000, 1, "PCM_24"), (22_050, 2, "PCM_U8"), (11_025, 1, "PCM_16"),
                (96_000, 2, "PCM_24"), (8_000, 1, "FLOAT"), (32_000, 1, "PCM_32")]


def make_us8k(root: Path, classes: int = 3, seconds: float = 0.3) -> Path:
    rows = []
    i = 0
    for fold in range(1, 11):
        for cid in range(classes):
            sr, ch, subtype = US8K_FORMATS[i % len(US8K_FORMATS)]
            fsid = 10000 + i
            name = f"{fsid}-{cid}-0-{fold % 3}.wav"
            write_wav(root / "audio" / f"fold{fold}" / name, seconds, sr, ch, subtype, seed=i)
            rows.append({"slice_file_name": name, "fsID": fsid, "start": 0.0, "end": seconds,
                         "salience": 1 + i % 2, "fold": fold, "classID": cid, "class": US8K_CLASSES[cid]})
            i += 1
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    with open(root / "metadata" / "UrbanSound8K.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=US8K_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return root


# --------------------------------------------------------------------------- Speech Commands v2

# The 35 word folders of the v2 release (the recipe checks them).
GSC_WORDS = ["backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go",
             "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven",
             "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow", "yes", "zero"]


def make_gsc(root: Path, per_word: int = 5, seconds: float = 0.3) -> dict[str, list[str]]:
    """Returns {"train"|"val"|"test": [relative paths]} as the official lists define them."""
    split = {"train": [], "val": [], "test": []}
    seed = 0
    for word in GSC_WORDS:
        for n in range(per_word):
            speaker = hashlib.sha1(f"{word}{n}".encode()).hexdigest()[:8]
            rel = f"{word}/{speaker}_nohash_{n}.wav"
            write_wav(root / rel, seconds, 16_000, seed=seed)
            seed += 1
            split["val" if n == 0 else "test" if n == 1 else "train"].append(rel)
    (root / "validation_list.txt").write_text("".join(f"{p}\n" for p in split["val"]))
    (root / "testing_list.txt").write_text("".join(f"{p}\n" for p in split["test"]))
    write_wav(root / "_background_noise_" / "white_noise.wav", 1.0, 16_000, seed=99)
    (root / "_background_noise_" / "README.md").write_text("background noise\n")
    (root / "LICENSE").write_text("CC-BY-4.0\n")
    (root / "README.md").write_text("Speech Commands v0.02\n")
    return split


# --------------------------------------------------------------------------- Fluent Speech Commands

FSC_COLUMNS = ["", "path", "speakerId", "transcription", "action", "object", "location"]
FSC_INTENTS = [("activate", "lights", "kitchen", "Turn on the kitchen lights"),
               ("decrease", "volume", "none", "Turn the volume down"),
               ("change language", "Chinese", "none", "Switch to Chinese")]


def make_fsc(root: Path, seconds: float = 0.3) -> dict[str, list[tuple[str, str]]]:
    """Returns {"train"|"val"|"test": [(path, intent)]}; train has 2 clips per intent, val/test 1."""
    out = {"train": [], "val": [], "test": []}
    (root / "data").mkdir(parents=True, exist_ok=True)
    seed = 0
    for split, fname, per in (("train", "train", 2), ("val", "valid", 1), ("test", "test", 1)):
        rows = []
        for action, obj, loc, text in FSC_INTENTS:
            for k in range(per):
                speaker = f"spk{split}{k}XyZ"
                uid = hashlib.md5(f"{split}{action}{k}".encode()).hexdigest()
                rel = f"wavs/speakers/{speaker}/{uid}.wav"
                write_wav(root / rel, seconds, 16_000, seed=seed)
                seed += 1
                rows.append({"": len(rows), "path": rel, "speakerId": speaker, "transcription": text,
                             "action": action, "object": obj, "location": loc})
                out[split].append((rel, f"{action}|{obj}|{loc}"))
        with open(root / "data" / f"{fname}_data.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FSC_COLUMNS)
            w.writeheader()
            w.writerows(rows)
    return out


@pytest.fixture
def esc50(tmp_path) -> Path:
    return make_esc50(tmp_path / "ESC-50-master")


@pytest.fixture
def us8k(tmp_path) -> Path:
    return make_us8k(tmp_path / "UrbanSound8K")


@pytest.fixture
def gsc(tmp_path):
    root = tmp_path / "speech_commands_v0.02"
    return root, make_gsc(root)


@pytest.fixture
def fsc(tmp_path):
    root = tmp_path / "fluent_speech_commands_dataset"
    return root, make_fsc(root)


@pytest.fixture
def afx():
    """The writers above, for tests that build their own variants (`afx.write_wav(...)`)."""
    import types

    return types.SimpleNamespace(tone=tone, write_wav=write_wav, corrupt=corrupt, make_esc50=make_esc50,
                                 make_us8k=make_us8k, make_gsc=make_gsc, make_fsc=make_fsc, FSDD=FSDD,
                                 ESC50_COLUMNS=ESC50_COLUMNS, ESC50_CATEGORIES=ESC50_CATEGORIES,
                                 US8K_CLASSES=US8K_CLASSES, GSC_WORDS=GSC_WORDS, FSC_INTENTS=FSC_INTENTS)
