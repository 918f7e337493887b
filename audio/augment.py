"""Waveform augmentation for training (`data.init_args.wave_augment`): other voices, levels and rooms.

Feature-level SpecAugment (`specaugment: true`) masks what a clip has; these change the clip the
way another recording of the same word would differ, so a model trained on a few speakers meets
new ones better. Training clips are then decoded and featurised every epoch (no feature cache;
validation and test still use the cache). All draws come from torch's generator, seeded by the run
(`seed_everything`; Lightning seeds each DataLoader worker).

Steps, in order, each off unless set:

- `speed: [lo, hi]`: resample by a factor drawn from lo..hi (step 0.05): tempo and pitch together,
  as Kaldi's speed perturbation (0.9 / 1.0 / 1.1); > 1 is faster and higher (a shorter vocal tract).
- `gain_db: g`: scale by 10^(u / 20), u uniform in [-g, g] (a no-op when the frontend normalises the peak).
- `noise_snr_db: [lo, hi]` (with probability `noise_p`): white noise at a signal-to-noise ratio drawn
  from lo..hi dB, relative to the clip's RMS.
- then the frontend's own waveform steps (Whisper: band limit, silence trim, peak; `WhisperMelConfig.prepare`),
- `shift_s: s`: 0..s seconds of silence before the clip (where the word starts in the window).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio

from audio.features import read_audio

SPEED_STEP = 0.05  # factors on a 0.05 grid: 16 kHz x factor shares a large divisor with 16 kHz (short kernels)


def _range(name: str, value, lo_min: float = 0.0) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"data.init_args.wave_augment.{name}: must be [low, high], got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or lo < lo_min:
        raise ValueError(f"data.init_args.wave_augment.{name}: must be [low, high] with {lo_min:g} <= low <= high, "
                         f"got {value!r}")
    return lo, hi


@dataclass
class WaveAugment:
    """Random waveform perturbations (module docstring); `perturb` before the frontend's own steps,
    `shift` after them."""

    speed: tuple[float, float] | None = None
    gain_db: float = 0.0
    noise_snr_db: tuple[float, float] | None = None
    noise_p: float = 0.5
    shift_s: float = 0.0
    sample_rate: int = 16_000

    def __post_init__(self):
        self.speed = _range("speed", self.speed, lo_min=0.5)
        self.noise_snr_db = _range("noise_snr_db", self.noise_snr_db, lo_min=-math.inf)
        for name, hi in (("gain_db", 40.0), ("noise_p", 1.0), ("shift_s", 10.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi:
                raise ValueError(f"data.init_args.wave_augment.{name}: must be a number in [0, {hi:g}], got {v!r}")

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def perturb(self, wave: torch.Tensor) -> torch.Tensor:
        """Speed, gain, noise (each when set) of a mono waveform at `sample_rate`."""
        if self.speed is not None:
            f = round(self._uniform(*self.speed) / SPEED_STEP) * SPEED_STEP
            if abs(f - 1.0) > 1e-6:  # read as if recorded at sr * f, played back at sr
                wave = torchaudio.functional.resample(wave, int(round(self.sample_rate * f)), self.sample_rate)
        if self.gain_db:
            wave = wave * 10 ** (self._uniform(-self.gain_db, self.gain_db) / 20)
        if self.noise_snr_db is not None and float(torch.rand(())) < self.noise_p:
            rms = wave.pow(2).mean().sqrt()
            snr = self._uniform(*self.noise_snr_db)
            wave = wave + torch.randn_like(wave) * (rms / 10 ** (snr / 20))
        return wave

    def shift(self, wave: torch.Tensor) -> torch.Tensor:
        """0..shift_s seconds of silence before the clip."""
        n = int(float(torch.rand(())) * self.shift_s * self.sample_rate) if self.shift_s else 0
        return F.pad(wave, (n, 0)) if n else wave


class AugmentedFeatures:
    """A training frontend: read a file, `augment.perturb`, the frontend's waveform steps (`prepare`,
    when it has them), `augment.shift`, then the features. Called like `FbankCache` (path -> features)."""

    def __init__(self, cfg, augment: WaveAugment):
        if augment.sample_rate != cfg.sample_rate:
            augment = WaveAugment(**{**augment.__dict__, "sample_rate": cfg.sample_rate})
        self.cfg, self.augment = cfg, augment

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        source = str(path)
        wave = self.augment.perturb(read_audio(path, self.cfg.sample_rate))
        prepare = getattr(self.cfg, "prepare", None)
        if prepare is None:  # a frontend without waveform steps (AST's fbank)
            return self.cfg.compute(self.augment.shift(wave), source=source)
        wave, _ = prepare(wave, source)
        return self.cfg.features(self.augment.shift(wave), source)
