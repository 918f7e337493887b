"""Bird-like data in the BirdSet csv layout (`audio.birds.birdset`), for the offline demo, the tests and
the real-audio tier.

- `write_synthetic_birds(root)`: each "species" is a call shape in its own frequency band (up-chirp,
  down-chirp, trill, whistle with vibrato, warble, two-note call) with random pitch, timing and
  level; focal recordings (6 s, one bout, `detected_events` = where it is) train, and 15 s
  soundscapes with 2-4 calls (overlapping at times) over pink-ish background noise are cut into
  5 s windows labelled with every species calling in them (>= 0.1 s inside the window).
- `write_fsdd_soundscapes(recordings, root)`: FSDD spoken digits as "species": focal clips of the
  training speakers, soundscapes mixed from held-out speakers (2 or 3 digits, overlapping, + noise).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import soundfile as sf

from audio.birds.birdset import DataNotFound, write_csv_layout

SR = 32_000
SPECIES = ["upchirp", "downchirp", "trill", "whistle", "warble", "twonote"]
MIN_OVERLAP_S = 0.1


def call(kind: str, rng: np.random.Generator, sr: int = SR) -> np.ndarray:
    """One call of a species: a windowed waveform of 0.2 - 1 s."""
    j = rng.uniform(0.92, 1.08)  # pitch jitter
    if kind == "upchirp":
        d = 0.35
        t = np.arange(int(d * sr)) / sr
        f = j * (2000 + 2500 * t / d)
    elif kind == "downchirp":
        d = 0.3
        t = np.arange(int(d * sr)) / sr
        f = j * (7000 - 3000 * t / d)
    elif kind == "trill":
        d = 0.6
        t = np.arange(int(d * sr)) / sr
        f = np.full_like(t, j * 5000)
    elif kind == "whistle":
        d = 0.9
        t = np.arange(int(d * sr)) / sr
        f = j * (1400 + 60 * np.sin(2 * np.pi * 5 * t))
    elif kind == "warble":
        d = 0.6
        t = np.arange(int(d * sr)) / sr
        f = j * (9000 + 700 * np.sin(2 * np.pi * 14 * t))
    elif kind == "twonote":
        d = 0.4
        t = np.arange(int(d * sr)) / sr
        f = np.where(t < d / 2, j * 3200, j * 2400)
    else:
        raise ValueError(f"unknown species {kind!r}; known: {SPECIES}")
    x = np.sin(2 * np.pi * np.cumsum(f) / sr)
    if kind == "trill":  # 8 short pulses
        x *= (np.sin(2 * np.pi * 8 / d * t) > 0.3)
    return (x * np.hanning(t.size)).astype(np.float32)


def background(n: int, rng: np.random.Generator, level: float) -> np.ndarray:
    """Pink-ish noise (white noise through a one-pole low-pass) plus a little white noise."""
    from scipy.signal import lfilter

    w = rng.standard_normal(n)
    pink = lfilter([0.03], [1.0, -0.97], w)  # y[k] = 0.97 y[k-1] + 0.03 w[k]
    pink /= np.abs(pink).max() + 1e-9
    return (level * (0.8 * pink + 0.2 * w / 3)).astype(np.float32)


def _place(track: np.ndarray, x: np.ndarray, start: int) -> None:
    end = min(track.size, start + x.size)
    track[start:end] += x[: end - start]


def window_labels(events: list[tuple[int, float, float]], windows, min_overlap: float = MIN_OVERLAP_S):
    """Per window, the sorted classes whose events overlap it by at least `min_overlap` s."""
    out = []
    for s, e in windows:
        out.append(sorted({c for c, es, ee in events if min(e, ee) - max(s, es) >= min_overlap}))
    return out


def write_synthetic_birds(root: str | os.PathLike, num_species: int = 5, focal_per_species: int = 8,
                          soundscapes: int = 12, seed: int = 0, soundscape_s: float = 15.0) -> Path:
    """Write the dataset (idempotent: an existing complete copy is reused). Returns `root`."""
    root = Path(root)
    if (root / "test.csv").is_file():
        return root
    if not 1 <= num_species <= len(SPECIES):
        raise ValueError(f"num_species must be 1..{len(SPECIES)}")
    species = SPECIES[:num_species]
    rng = np.random.default_rng(seed)
    (root / "focal").mkdir(parents=True, exist_ok=True)
    (root / "soundscapes").mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = [], []
    for c, kind in enumerate(species):
        for k in range(focal_per_species):
            n = int(6.0 * SR)
            track = background(n, rng, rng.uniform(0.02, 0.06))
            onset = rng.uniform(0.2, 4.0)
            pos, calls = onset, int(rng.integers(2, 4))
            for _ in range(calls):  # a bout: 2-3 calls of the species
                x = call(kind, rng) * rng.uniform(0.4, 0.9)
                _place(track, x, int(pos * SR))
                pos += x.size / SR + rng.uniform(0.05, 0.3)
            name = f"focal/{kind}_{k:02d}.wav"
            sf.write(root / name, np.clip(track, -1, 1), SR, subtype="PCM_16")
            train_rows.append({"filepath": name, "ebird_code": kind,
                               "detected_events": f"{onset:.3f}-{min(pos, 6.0):.3f}"})
    for s in range(soundscapes):
        n = int(soundscape_s * SR)
        track = background(n, rng, rng.uniform(0.03, 0.08))
        events = []
        for _ in range(int(rng.integers(2, 5))):
            c = int(rng.integers(num_species))
            x = call(species[c], rng) * rng.uniform(0.3, 0.9)
            start = rng.uniform(0, soundscape_s - x.size / SR)
            _place(track, x, int(start * SR))
            events.append((c, start, start + x.size / SR))
        name = f"soundscapes/soundscape_{s:03d}.wav"
        sf.write(root / name, np.clip(track, -1, 1), SR, subtype="PCM_16")
        windows = [(t, t + 5.0) for t in np.arange(0.0, soundscape_s - 4.999, 5.0)]
        for (ws, we), labels in zip(windows, window_labels(events, windows)):
            test_rows.append({"filepath": name, "start_time": f"{ws:g}", "end_time": f"{we:g}",
                              "ebird_code_multilabel": ";".join(species[c] for c in labels)})
    write_csv_layout(root, train_rows, test_rows, species)  # the csv files last: a torn run is redone
    return root


FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def write_fsdd_soundscapes(recordings: str | os.PathLike, root: str | os.PathLike,
                           test_speakers: tuple[str, ...] = ("theo", "nicolas"), soundscapes: int = 120,
                           soundscape_s: float = 10.0, seed: int = 0, noise: float = 0.02) -> Path:
    """Focal clips = FSDD recordings of all speakers but `test_speakers` (referenced in place);
    soundscapes = 2-3 digits of the held-out speakers placed at random, overlapping at times, over
    background noise, written as 32 kHz wav and cut into 5 s windows. Idempotent."""
    import torch
    import torchaudio

    src, root = Path(recordings), Path(root)
    if (root / "test.csv").is_file():
        return root
    files = sorted(p for p in src.glob("*.wav") if FSDD_NAME.match(p.name))
    if not files:
        raise DataNotFound(f"{src}: no FSDD recordings (DIGIT_SPEAKER_TAKE.wav)")
    digits = [str(d) for d in range(10)]
    train_rows, held = [], []
    for p in files:
        d, speaker, _ = FSDD_NAME.match(p.name).groups()
        if speaker in test_speakers:
            held.append((int(d), p))
        else:
            train_rows.append({"filepath": str(p.resolve()), "ebird_code": d, "detected_events": ""})
    if not held:
        raise ValueError(f"{src}: no recordings of the held-out speakers {test_speakers}")
    rng = np.random.default_rng(seed)
    (root / "soundscapes").mkdir(parents=True, exist_ok=True)
    test_rows = []
    for s in range(soundscapes):
        n = int(soundscape_s * SR)
        track = background(n, rng, noise)
        events = []
        for _ in range(int(rng.integers(2, 4))):
            d, p = held[int(rng.integers(len(held)))]
            data, sr = sf.read(str(p), dtype="float32", always_2d=True)
            x = torchaudio.functional.resample(torch.from_numpy(data.mean(1)), sr, SR).numpy()
            x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.4, 0.9)
            start = rng.uniform(0, soundscape_s - x.size / SR)
            _place(track, x, int(start * SR))
            events.append((d, start, start + x.size / SR))
        name = f"soundscapes/mix_{s:03d}.wav"
        sf.write(root / name, np.clip(track, -1, 1), SR, subtype="PCM_16")
        windows = [(t, t + 5.0) for t in np.arange(0.0, soundscape_s - 4.999, 5.0)]
        for (ws, we), labels in zip(windows, window_labels(events, windows)):
            test_rows.append({"filepath": name, "start_time": f"{ws:g}", "end_time": f"{we:g}",
                              "ebird_code_multilabel": ";".join(str(c) for c in labels)})
    write_csv_layout(root, train_rows, test_rows, digits)
    return root


from audio.birds.birdset import BirdSetDataModule  # noqa: E402  (below the writers it wraps)

DEMO_NOTE = "synthetic bird calls (focal clips + multi-label soundscapes, BirdSet csv layout)"
FSDD_NOTE = "FSDD soundscapes mixed from held-out speakers (BirdSet csv layout)"


class SyntheticBirdsDataModule(BirdSetDataModule):
    """The demo's data: writes `write_synthetic_birds` into `root` (only a new, empty or earlier demo
    folder: a folder holding anything else is refused) and reads it as the csv layout."""

    def __init__(self, root: str = "runs/bioacoustic_demo/birds", num_species: int = 5, focal_per_species: int = 8,
                 soundscapes: int = 12, few_shot: int | None = None, seed: int = 0, batch_size: int = 32,
                 num_workers: int = 0, val_fraction: float = 0.0, pad: str = "waveform", frontend: str = "birdmae",
                 target_frames: int | None = None):
        super().__init__(root, layout="csv", few_shot=few_shot, seed=seed, batch_size=batch_size,
                         num_workers=num_workers, val_fraction=val_fraction, pad=pad, frontend=frontend,
                         target_frames=target_frames)
        self.num_species, self.focal_per_species, self.soundscapes = num_species, focal_per_species, soundscapes
        self.name = "synthetic-birds"

    def prepare(self) -> None:
        from shared.cli import prepare_demo_data

        prepare_demo_data(self.root, lambda r: write_synthetic_birds(
            r, self.num_species, self.focal_per_species, self.soundscapes, self.seed), DEMO_NOTE)


class FSDDSoundscapesDataModule(BirdSetDataModule):
    """Real-audio tier: FSDD digits as species. Train on focal clips of every speaker but
    `test_speakers`; test on soundscapes mixed (into `root`, a folder of ours) from the held-out ones."""

    def __init__(self, recordings: str = "../shared/data/fsdd/recordings",
                 root: str = "runs/bioacoustic_fsdd/soundscapes", test_speakers: list[str] | None = None,
                 soundscapes: int = 60, few_shot: int | None = None, seed: int = 0, batch_size: int = 32,
                 num_workers: int = 0, val_fraction: float = 0.0, pad: str = "waveform", frontend: str = "birdmae",
                 target_frames: int | None = None):
        super().__init__(root, layout="csv", few_shot=few_shot, seed=seed, batch_size=batch_size,
                         num_workers=num_workers, val_fraction=val_fraction, pad=pad, frontend=frontend,
                         target_frames=target_frames)
        self.recordings = Path(recordings).expanduser()
        self.test_speakers = tuple(test_speakers or ("theo", "nicolas"))
        self.n_soundscapes = soundscapes
        self.name = "fsdd-soundscapes"

    def prepare(self) -> None:
        if not self.recordings.is_dir():
            raise DataNotFound(f"{self.recordings}: FSDD recordings folder not found (--data.recordings)")
        from shared.cli import prepare_demo_data

        prepare_demo_data(self.root, lambda r: write_fsdd_soundscapes(
            self.recordings, r, self.test_speakers, self.n_soundscapes, seed=self.seed), FSDD_NOTE)
