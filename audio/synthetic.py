"""A small deterministic dataset in the ESC-50 layout, for the offline demo and tests.

Each class is a distinct synthetic sound (tone, chirp, noise bursts, harmonic stack, click
train, ...) with random pitch, timing and noise per clip, written as 44.1 kHz 16-bit wav files
with `meta/esc50.csv` exactly as ESC-50 ships them.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from shared.fs import atomic_path

CLASSES = ["tone", "chirp", "noise_bursts", "harmonic_stack", "click_train", "warble"]
COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]


def synth(kind: str, rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    f0 = rng.uniform(300, 1200)
    if kind == "tone":
        x = np.sin(2 * np.pi * f0 * t)
    elif kind == "chirp":
        f = f0 + (3000 - f0) * t / seconds
        x = np.sin(2 * np.pi * np.cumsum(f) / sr)
    elif kind == "noise_bursts":
        gate = (np.sin(2 * np.pi * rng.uniform(2, 5) * t) > 0.3).astype(float)
        x = rng.standard_normal(t.size) * gate
    elif kind == "harmonic_stack":
        x = sum(np.sin(2 * np.pi * k * f0 / 3 * t) / k for k in range(1, 8))
    elif kind == "click_train":
        x = np.zeros_like(t)
        x[:: int(sr / rng.uniform(8, 20))] = 1.0
        x = np.convolve(x, np.hanning(64), mode="same")
    elif kind == "warble":
        x = np.sin(2 * np.pi * f0 * t + 8 * np.sin(2 * np.pi * rng.uniform(4, 9) * t))
    else:
        raise ValueError(f"unknown synthetic sound {kind!r}")
    x = x / (np.abs(x).max() + 1e-9)
    x = x * np.clip(rng.uniform(0.3, 1.0), 0, 1) + rng.uniform(0.02, 0.15) * rng.standard_normal(t.size)
    onset = int(rng.uniform(0, 0.3) * t.size)  # random start inside the clip
    return np.roll(x, onset).clip(-1, 1).astype(np.float32)


def write_esc50_like(root: str | os.PathLike, num_classes: int = 5, clips_per_fold: int = 6,
                     seconds: float = 5.0, sr: int = 44_100, seed: int = 0) -> Path:
    """Write the dataset (idempotent: an existing complete copy is reused). Returns `root`."""
    root = Path(root)
    meta = root / "meta" / "esc50.csv"
    if meta.is_file():
        return root
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be 1..{len(CLASSES)}")
    from shared.cli import mark_demo_folder

    mark_demo_folder(root, "synthetic sounds in the ESC-50 layout")  # ours: the demo may write here again
    rng = np.random.default_rng(seed)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for fold in range(1, 6):
        for target in range(num_classes):
            for take in range(clips_per_fold):
                src = 1000 * fold + 10 * target + take
                name = f"{fold}-{src}-A-{target}.wav"
                sf.write(root / "audio" / name, synth(CLASSES[target], rng, sr, seconds), sr, subtype="PCM_16")
                rows.append([name, fold, target, CLASSES[target], "False", src, "A"])
    with atomic_path(meta) as tmp, open(tmp, "w", newline="") as f:  # the csv appears last: a torn run is redone
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    return root
