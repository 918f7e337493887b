"""Bird-MAE's frontend: 32 kHz audio -> (512 frames x 128 mel) normalised kaldi fbank, and the 5 s
windows BirdSet evaluates on.

- `fbank_birdmae(wave)`: the clip zero-padded at its end (or cut) to the 5 s window as a
  waveform (Bird-MAE's feature extractor: `padding="max_length"`, padding value 0, truncation),
  DC offset removed, kaldi fbank (htk_compat, 25 ms hanning window, 10 ms hop, 128 mel, no energy,
  dither 0; 498 frames for 5 s), padded with the clip's minimum (silence) or trimmed to 512
  frames, normalised (x - (-7.2)) / (2 * 4.43) — the AudioMAE convention of dividing by twice the
  std, which the Bird-MAE hub feature extractor keeps. `BirdFbankConfig(pad="fbank_min")` is the
  former convention: a short clip's own fbank padded with its minimum (no zero-padded audio, so
  no frames straddling the clip's end), a longer one's first 512 frames.
- `BirdWhisperConfig`: Whisper's log-mel (16 kHz, 80 slaney mel, 10 ms hop) of the same windows,
  (mels, frames), for a `whisper` backbone (`frontend: whisper` in the data modules).
- `read_clip(path, start, end)`: mono float32 at 32 kHz from any rate; one `AudioError` naming the
  file when it is unreadable, silent, not finite, or shorter than a window it was asked for.
- `event_window(events, duration)`: the 5 s window centred on a focal recording's first detected
  event (BirdSet `detected_events`), clipped to the recording.
- `sliding_windows(duration)`: the 5 s windows of a soundscape (hop 5 s by default).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torchaudio.compliance import kaldi

from audio.features import AudioError, check_silence, read_audio

SAMPLE_RATE = 32_000
WINDOW_S = 5.0
BIRDMAE_MEAN, BIRDMAE_STD = -7.2, 4.43
FRAMES, MELS = 512, 128
PADS = ("waveform", "fbank_min")


@dataclass(frozen=True)
class BirdFbankConfig:
    frames: int = FRAMES
    num_mel_bins: int = MELS
    sample_rate: int = SAMPLE_RATE
    window_s: float = WINDOW_S
    mean: float = BIRDMAE_MEAN
    std: float = BIRDMAE_STD
    pad: str = "waveform"  # short clips: "waveform" (zeros up to window_s, Bird-MAE) or "fbank_min"

    def __post_init__(self):
        if self.pad not in PADS:
            raise ValueError(f"BirdFbankConfig.pad must be one of {PADS}, got {self.pad!r}")

    def to_dict(self) -> dict:
        return {"frontend": "fbank_birdmae", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "BirdFbankConfig":
        """The config a bundle's `preprocessing` describes; one saved before `pad` existed was
        computed with "fbank_min", and keeps it."""
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{"pad": "fbank_min", **fields})

    # the layout of the features `compute` returns, for the explanation picture
    frequency_scale = "kaldi"  # mel points of kaldi's fbank, from LOW_HZ to Nyquist
    low_hz = 20.0

    def compute(self, wave: torch.Tensor, source: str = "waveform") -> torch.Tensor:
        """(1, frames, mels): one window's model input (`fbank_birdmae`)."""
        return fbank_birdmae(wave, self, source).unsqueeze(0)

    @staticmethod
    def spectrogram(x: torch.Tensor) -> torch.Tensor:
        """A model input (1, frames, mels) as (mels, frames)."""
        return x[0].T


@dataclass(frozen=True)
class BirdWhisperConfig:
    """Whisper's log-mel frontend (`audio.whisper.logmel_whisper`: 16 kHz, 25 ms window, 10 ms hop,
    slaney mel from 0 Hz to 8 kHz) on BirdSet's 5 s windows, for a `whisper` backbone: a window is
    zero-padded as a waveform to `target_frames` x 10 ms (Whisper pads every input so), and
    `target_frames` must hold the whole window (500 frames for 5 s). Features are (mels, frames),
    Whisper's layout; bundles record `frontend: whisper_logmel`."""

    target_frames: int = 500
    num_mel_bins: int = 80
    sample_rate: int = 16_000
    window_s: float = WINDOW_S
    pad = "waveform"  # not a setting: Whisper's padding is always zeros appended to the waveform
    frequency_scale = "slaney"  # Whisper's mel filters: slaney scale from 0 Hz to Nyquist
    low_hz = 0.0

    def __post_init__(self):
        self.mel()  # checks target_frames, num_mel_bins and sample_rate (one line each)
        if not self.window_s > 0:
            raise ValueError(f"whisper frontend: window_s must be > 0, got {self.window_s!r}")
        if self.target_frames * 0.010 < self.window_s - 1e-9:
            need = int(math.ceil(self.window_s / 0.010 / 2) * 2)
            raise ValueError(f"whisper frontend: target_frames={self.target_frames} covers "
                             f"{self.target_frames * 0.010:g} s, less than the {self.window_s:g} s window "
                             f"(set data.init_args.target_frames and backbone_kwargs.max_frames to >= {need})")

    def mel(self):
        from audio.whisper import WhisperMelConfig

        return WhisperMelConfig(self.target_frames, self.num_mel_bins, self.sample_rate)

    def to_dict(self) -> dict:
        from audio.whisper import FRONTEND

        return {"frontend": FRONTEND, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "BirdWhisperConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def compute(self, wave: torch.Tensor, source: str = "waveform") -> torch.Tensor:
        """(mels, target_frames): one window's model input (`logmel_whisper`)."""
        from audio.whisper import logmel_whisper

        wave = torch.as_tensor(wave, dtype=torch.float32).flatten()
        return logmel_whisper(wave, self.mel(), source)

    @staticmethod
    def spectrogram(x: torch.Tensor) -> torch.Tensor:
        """A model input (mels, frames) as (mels, frames)."""
        return x


FRONTENDS = ("birdmae", "whisper")


def frontend_config(frontend: str = "birdmae", pad: str = "waveform", target_frames: int | None = None):
    """The data modules' `frontend` setting -> its config: "birdmae" (`BirdFbankConfig`, `pad`) or
    "whisper" (`BirdWhisperConfig`, `target_frames`, default 500 = the 5 s window)."""
    if frontend == "birdmae":
        if target_frames is not None:
            raise ValueError("data.init_args.target_frames applies to frontend: whisper only (Bird-MAE's fbank "
                             "is always 512 frames)")
        return BirdFbankConfig(pad=pad)
    if frontend == "whisper":
        if pad != "waveform":
            raise ValueError(f"data.init_args.pad: {pad!r} cannot apply to frontend: whisper (Whisper zero-pads "
                             f"the waveform, pad: waveform)")
        return BirdWhisperConfig() if target_frames is None else BirdWhisperConfig(target_frames=target_frames)
    raise ValueError(f"data.init_args.frontend must be one of {', '.join(FRONTENDS)}, got {frontend!r}")


def config_from_dict(d: dict):
    """The frontend config a bundle's `preprocessing` records (Bird-MAE's fbank when it names none)."""
    from audio.whisper import FRONTEND

    name = (d or {}).get("frontend", "fbank_birdmae")
    if name == FRONTEND:
        return BirdWhisperConfig.from_dict(d)
    if name == "fbank_birdmae":
        return BirdFbankConfig.from_dict(d or {})
    raise ValueError(f"preprocessing.frontend {name!r} is not a bioacoustic frontend (fbank_birdmae, {FRONTEND})")


def fbank_birdmae(wave: torch.Tensor, cfg: BirdFbankConfig = BirdFbankConfig(), source: str = "waveform") -> torch.Tensor:
    """(T,) waveform at cfg.sample_rate -> (frames, num_mel_bins) normalised log-mel fbank."""
    wave = torch.as_tensor(wave, dtype=torch.float32).flatten()
    if wave.numel() < int(0.025 * cfg.sample_rate):
        raise AudioError(f"{source}: too short for one 25 ms frame ({wave.numel()} samples)")
    if cfg.pad == "waveform":  # exactly one window of audio: zeros at the end, or cut (the reference's order:
        window = int(round(cfg.window_s * cfg.sample_rate))  # pad / truncate first, then the DC offset)
        wave = torch.nn.functional.pad(wave, (0, window - wave.numel())) if wave.numel() < window else wave[:window]
    wave = wave - wave.mean()
    fb = kaldi.fbank(wave.unsqueeze(0), htk_compat=True, sample_frequency=cfg.sample_rate, use_energy=False,
                     window_type="hanning", num_mel_bins=cfg.num_mel_bins, dither=0.0, frame_shift=10)
    n = fb.shape[0]
    if n < cfg.frames:  # pad with the clip's quietest value: silence, not 0 (log-mel 0 is loud)
        fb = torch.nn.functional.pad(fb, (0, 0, 0, cfg.frames - n), value=float(fb.min()))
    out = (fb[: cfg.frames] - cfg.mean) / (2 * cfg.std)
    if not torch.isfinite(out).all():
        raise AudioError(f"{source}: features are not finite")
    return out


def read_clip(path: str | os.PathLike, start: float | None = None, end: float | None = None,
              sample_rate: int = SAMPLE_RATE, allow_truncated: bool = False,
              allow_silent: bool = False) -> torch.Tensor:
    """Mono waveform of `path` (or its [start, end) seconds) at `sample_rate`; a silent one raises
    (`audio.features.check_silence`, the rule audio.predict applies too) unless `allow_silent`."""
    wave = read_audio(path, sample_rate, allow_truncated)
    if start is not None or end is not None:
        s = int(round((start or 0.0) * sample_rate))
        e = wave.numel() if end is None else int(round(end * sample_rate))
        if s >= wave.numel() or e <= s:
            raise AudioError(f"{path}: window {start}-{end} s lies outside the recording "
                             f"({wave.numel() / sample_rate:.2f} s)")
        wave = wave[s:e]
    check_silence(wave, str(path), allow_silent, where=f" in {start}-{end} s" if start is not None else "")
    return wave


def event_window(events, duration: float, window_s: float = WINDOW_S) -> tuple[float, float]:
    """(start, end) of the window centred on the first event [(s, e), ...]; (0, window) without events.

    The window is shifted to stay inside [0, duration]; recordings shorter than a window give (0, duration)."""
    if duration <= window_s:
        return 0.0, float(duration)
    if events is None or len(events) == 0:
        return 0.0, window_s
    s, e = (float(v) for v in events[0])
    centre = 0.5 * (s + e)
    start = min(max(0.0, centre - window_s / 2), duration - window_s)
    return start, start + window_s


def sliding_windows(duration: float, window_s: float = WINDOW_S, hop_s: float | None = None,
                    source: str = "recording") -> list[tuple[float, float]]:
    """Consecutive windows covering [0, duration]; the last partial window is kept when it is at
    least half a window long. A recording shorter than one window raises."""
    hop_s = window_s if hop_s is None else hop_s
    if duration < window_s:
        raise AudioError(f"{source}: soundscape of {duration:.2f} s is shorter than one {window_s:g} s window")
    out, t = [], 0.0
    while t + window_s <= duration + 1e-9:
        out.append((round(t, 6), round(t + window_s, 6)))
        t += hop_s
    if duration - t >= window_s / 2 and (not out or out[-1][1] < duration):
        out.append((round(t, 6), round(duration, 6)))
    return out


def clip_features(path: str | Path, start: float | None, end: float | None,
                  cfg: BirdFbankConfig = BirdFbankConfig()) -> torch.Tensor:
    """The model input for one window of one file: (1, frames, mels) for Bird-MAE's fbank, (mels,
    frames) for `BirdWhisperConfig`."""
    return cfg.compute(read_clip(path, start, end, cfg.sample_rate), source=str(path))


def duration_of(path: str | os.PathLike) -> float:
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as e:
        raise AudioError(f"{path}: unreadable audio ({e})") from None
    return info.frames / info.samplerate


__all__ = ["SAMPLE_RATE", "WINDOW_S", "PADS", "FRONTENDS", "BirdFbankConfig", "BirdWhisperConfig", "frontend_config",
           "config_from_dict", "fbank_birdmae", "read_clip", "event_window",
           "sliding_windows", "clip_features", "duration_of"]
