"""Issue 8 (audio as a newcomer meets it): truncated files, predict's bad inputs, bundle domain
checks, demo folders, FSDD layout, offline checkpoints, CLI help and config errors."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audio.features import AudioError, read_audio


def _signal(n: int = 48_000) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (0.5 * np.sin(np.arange(n) / 5) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_truncated_flac_and_ogg_are_refused(tmp_path, fmt):
    full = tmp_path / f"clip.{fmt.lower()}"
    sf.write(full, _signal(), 16_000, format=fmt)
    assert read_audio(full).numel() == 48_000
    for frac in (0.5, 0.9):
        cut = tmp_path / f"cut{int(frac * 100)}.{fmt.lower()}"
        cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * frac)])
        with pytest.raises(AudioError, match=rf"{cut.name}: truncated"):
            read_audio(cut)


def test_truncated_ogg_reads_what_is_there_when_allowed(tmp_path):
    full = tmp_path / "clip.ogg"
    sf.write(full, _signal(), 16_000, format="OGG")
    cut = tmp_path / "cut.ogg"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.9)])
    part = read_audio(cut, allow_truncated=True)
    assert 20_000 < part.numel() < 48_000


def test_streamed_wav_with_placeholder_sizes_is_not_truncated(tmp_path):
    # Writers that stream (ffmpeg to a pipe) leave 0xFFFFFFFF in the RIFF and data sizes.
    x = (_signal(8_000) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 16_000, 32_000, 2, 16)
    p = tmp_path / "streamed.wav"
    p.write_bytes(b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + fmt + b"data" + struct.pack("<I", 0xFFFFFFFF) + x)
    assert read_audio(p).numel() == 8_000


def test_a_folder_given_as_a_file_says_is_a_folder(tmp_path):
    with pytest.raises(AudioError, match=rf"{tmp_path.name}: is a folder"):
        read_audio(tmp_path)
