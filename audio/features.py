"""Audio reading and the AST fbank frontend (numerically equal to transformers' ASTFeatureExtractor).

- `read_audio(path)`: any rate / channel count / bit depth -> mono float32 at 16 kHz, with one
  clear `AudioError` naming the file when it is unreadable, empty, truncated or not finite.
  Truncated means the container declares more audio than the file holds: a WAV / W64 / AIFF
  chunk size beyond the end of the file (libsndfile's own header log), a FLAC that ends before
  its STREAMINFO sample count, an Ogg (Vorbis / Opus) stream that ends without its end-of-stream
  page. `allow_truncated=True` reads what is there instead (`audio.predict --allow-truncated`).
- `check_silence(wave, source)`: the one silence rule of every prediction path (AST and Bird-MAE):
  a waveform whose every sample is below `SILENCE_PEAK` in magnitude is refused, naming the file,
  unless allowed (`audio.predict --allow-silent`), when it is predicted with a warning.
- `fbank_ast(wave)`: kaldi fbank (25 ms hanning, 10 ms hop, 128 mel) padded / trimmed to the
  dataset's frame count, normalised with AudioSet's mean and std as AST expects.
- `SpecAugment`: frequency and time masking (torchaudio), for training only.
- `FbankCache`: decoded features on disk, so epochs after the first never decode audio again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torchaudio.compliance import kaldi

from shared.fs import atomic_path

SAMPLE_RATE = 16_000
AST_MEAN, AST_STD = -4.2677393, 4.5689974
# Frames per dataset (PETL-AST): 10 ms hop, so 500 frames = 5 s.
TARGET_FRAMES = {"esc50": 500, "us8k": 400, "speech_commands": 100, "fsc": 400, "fsdd": 100, "audioset": 1024}


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file and the reason."""


# Below this peak magnitude (about -80 dBFS) a recording holds no signal: 16-bit PCM's smallest step
# is 3.1e-5, so digital silence with +-1 LSB dither is silent too, and any audible sound is far above.
SILENCE_PEAK = 1e-4


def check_silence(wave: torch.Tensor, source: str, allow_silent: bool = False, where: str = "",
                  hint: str = "") -> str | None:
    """None for a waveform with signal. A silent one (every |sample| < SILENCE_PEAK) raises
    `AudioError` naming `source` (and `where`, e.g. a window), or, with `allow_silent`, returns the
    warning to show: a model's answer for silence is not about the sound."""
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    if peak >= SILENCE_PEAK:
        return None
    what = f"{source}: silent audio{where} (peak |sample| {peak:.2g}, below {SILENCE_PEAK:g})"
    if not allow_silent:
        raise AudioError(what + hint)
    return what + "; predicted anyway (allowed), the result says nothing about the sound"


# libsndfile's header log writes "data : 32000 (should be 15978)" when a chunk's declared size
# does not match the bytes present (the RIFF/riff/FORM line does too, for the whole file).
_SIZE_MISMATCH = re.compile(r"^\s*(data|SSND|RIFF|riff|FORM|RF64)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)
_UNKNOWN_SIZES = {0, 0xFFFFFFFF, 0xFFFFFFFF - 8}  # streaming writers leave these placeholders


def _ogg_complete(path: Path) -> bool:
    """True when the Ogg file is a whole sequence of pages ending with an end-of-stream page."""
    data = path.read_bytes()
    pos, eos = 0, False
    while pos < len(data):
        if data[pos:pos + 4] != b"OggS" or pos + 27 > len(data):
            return False
        nseg = data[pos + 26]
        if pos + 27 + nseg > len(data):
            return False
        end = pos + 27 + nseg + sum(data[pos + 27:pos + 27 + nseg])
        if end > len(data):
            return False
        eos = bool(data[pos + 5] & 0x04)
        pos = end
    return eos


def truncation(path: Path, info) -> str | None:
    """Why `path` is truncated (its header declares more audio than it holds), or None."""
    found = _SIZE_MISMATCH.findall(info.extra_info or "")
    for chunk, declared, present in sorted(found, key=lambda f: f[0] not in ("data", "SSND")):  # data chunk first
        if int(declared) > int(present) and int(declared) not in _UNKNOWN_SIZES:
            return f"its header declares {chunk} of {int(declared):,} bytes but only {int(present):,} are present"
    if info.format == "OGG" and not _ogg_complete(path):
        return "the Ogg stream ends without its end-of-stream page"
    return None


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, allow_truncated: bool = False) -> torch.Tensor:
    """Mono float32 waveform (T,) at `sample_rate`, values in [-1, 1].

    A truncated file raises `AudioError` unless `allow_truncated` (then the samples present are used)."""
    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file")
    if not path.is_file():
        raise AudioError(f"{path}: file not found")
    hint = " (pass allow_truncated / --allow-truncated to use the samples present)"
    try:
        info = sf.info(str(path))
        why = truncation(path, info)
        if why and not allow_truncated:
            raise AudioError(f"{path}: truncated audio: {why}" + hint)
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C), any bit depth
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"OggS" and not _ogg_complete(path):
            raise AudioError(f"{path}: truncated audio: the Ogg stream ends without its end-of-stream page, "
                             f"and libsndfile cannot decode the part present ({e})") from None
        if magic == b"fLaC" and "lost sync" in str(e):
            raise AudioError(f"{path}: truncated or damaged FLAC: the decoder lost sync before the end its "
                             f"STREAMINFO declares ({e})") from None
        raise AudioError(f"{path}: unreadable audio ({e})") from None
    if info.format == "FLAC" and data.shape[0] < info.frames and not allow_truncated:  # STREAMINFO count
        raise AudioError(f"{path}: truncated audio: its header declares {info.frames:,} frames but only "
                         f"{data.shape[0]:,} could be read" + hint)
    if data.size == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    wave = torch.from_numpy(data.mean(axis=1))  # average channels -> mono
    if sr != sample_rate:
        wave = torchaudio.functional.resample(wave, sr, sample_rate)
    return wave


@dataclass(frozen=True)
class FbankConfig:
    target_frames: int = 1024
    num_mel_bins: int = 128
    sample_rate: int = SAMPLE_RATE
    mean: float = AST_MEAN
    std: float = AST_STD

    def to_dict(self):
        return {"frontend": "fbank_ast", **asdict(self)}

    def compute(self, wave: torch.Tensor, source: str = "waveform") -> torch.Tensor:
        """This frontend's features of one waveform (every frontend config has `compute`; see audio.whisper)."""
        return fbank_ast(wave, self, source)


def fbank_ast(wave: torch.Tensor, cfg: FbankConfig = FbankConfig(), source: str = "waveform") -> torch.Tensor:
    """(T,) waveform -> (target_frames, num_mel_bins) normalised log-mel fbank."""
    window = int(round(0.025 * cfg.sample_rate))  # one 25 ms frame
    if wave.numel() == 0:
        raise AudioError(f"{source}: empty audio (0 samples)")
    if wave.numel() < window:  # e.g. very short UrbanSound8K slices: zero-pad to one frame, as silence
        wave = torch.nn.functional.pad(wave, (0, window - wave.numel()))
    fb = kaldi.fbank(wave.float().unsqueeze(0), sample_frequency=cfg.sample_rate, window_type="hanning",
                     num_mel_bins=cfg.num_mel_bins)  # (frames, mel); kaldi defaults: dither 0, no energy
    n = fb.shape[0]
    if n < cfg.target_frames:
        fb = torch.nn.functional.pad(fb, (0, 0, 0, cfg.target_frames - n))  # zero-pad, then normalise (as HF)
    fb = fb[: cfg.target_frames]
    out = (fb - cfg.mean) / (2 * cfg.std)
    if not torch.isfinite(out).all():
        raise AudioError(f"{source}: features are not finite")
    return out


class SpecAugment(torch.nn.Module):
    """Frequency and time masking on (T, F) or (B, T, F) features; identity in eval mode."""

    def __init__(self, freq_mask: int = 24, time_mask: int = 80):
        super().__init__()
        self.freq = torchaudio.transforms.FrequencyMasking(freq_mask) if freq_mask else None
        self.time = torchaudio.transforms.TimeMasking(time_mask) if time_mask else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        y = x.transpose(-1, -2)  # torchaudio masks expect (..., freq, time)
        if self.freq is not None:
            y = self.freq(y)
        if self.time is not None:
            y = self.time(y)
        return y.transpose(-1, -2)


class FbankCache:
    """Features of audio files on disk, keyed by file identity (path, size, mtime) + frontend config
    (`FbankConfig` or `audio.whisper.WhisperMelConfig`: anything with `to_dict`, `sample_rate`, `compute`)."""

    def __init__(self, root: str | os.PathLike, cfg: FbankConfig):
        self.root, self.cfg = Path(root), cfg
        self.root.mkdir(parents=True, exist_ok=True)
        self._cfg_key = json.dumps(cfg.to_dict(), sort_keys=True)
        self.hits = self.misses = 0

    def _file(self, path: Path) -> Path:
        try:
            st = path.stat()
        except OSError:
            raise AudioError(f"{path}: file not found") from None
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self._cfg_key}"
        return self.root / (hashlib.sha1(ident.encode()).hexdigest() + ".npy")

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        path = Path(path)
        f = self._file(path)
        if f.exists():
            try:
                self.hits += 1
                return torch.from_numpy(np.load(f))
            except (ValueError, OSError, EOFError):
                f.unlink(missing_ok=True)  # a torn cache file: recompute
                self.hits -= 1
        self.misses += 1
        feats = self.cfg.compute(read_audio(path, self.cfg.sample_rate), source=str(path))
        with atomic_path(f) as tmp, open(tmp, "wb") as fh:
            np.save(fh, feats.numpy())
        return feats


def features(path: str | os.PathLike, cfg: FbankConfig = FbankConfig(), allow_truncated: bool = False,
             allow_silent: bool = False) -> torch.Tensor:
    """Read one file and compute its AST features (no cache); a silent file raises unless `allow_silent`
    (`check_silence`)."""
    wave = read_audio(path, cfg.sample_rate, allow_truncated)
    check_silence(wave, str(path), allow_silent)
    return fbank_ast(wave, cfg, source=str(path))
