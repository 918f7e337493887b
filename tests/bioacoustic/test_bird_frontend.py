"""Bird-MAE frontend: kaldi fbank settings, normalisation, padding, resampling, windows, bad audio."""
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from torchaudio.compliance import kaldi

from audio.birds.frontend import (BirdFbankConfig, clip_features, event_window, fbank_birdmae, read_clip,
                                 sliding_windows)
from audio.features import AudioError


def tone(freq, seconds, sr=32_000, amp=0.5):
    t = torch.arange(int(seconds * sr)) / sr
    return amp * torch.sin(2 * math.pi * freq * t)


def test_equals_kaldi_fbank_with_birdmae_settings():
    g = torch.Generator().manual_seed(0)
    w = 0.1 * torch.randn(160_000, generator=g) + 0.05  # 5 s at 32 kHz, with a DC offset
    ref = kaldi.fbank((w - w.mean())[None], htk_compat=True, sample_frequency=32_000, use_energy=False,
                      window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25)
    assert ref.shape == (498, 128)  # 1 + (160000 - 800) // 320 frames
    out = fbank_birdmae(w)
    assert out.shape == (512, 128)
    assert torch.allclose(out[:498], (ref + 7.2) / (2 * 4.43), atol=1e-5)
    # the 14 missing frames are silence: the clip's minimum, normalised the same way
    assert torch.allclose(out[498:], torch.full((14, 128), (float(ref.min()) + 7.2) / 8.86), atol=1e-5)


def test_tone_lands_in_its_mel_bin_and_longer_audio_is_trimmed():
    out = fbank_birdmae(tone(1000, 7.0))
    assert out.shape == (512, 128)
    # htk mel: mel(1000) = 1000; bins equally spaced from mel(20) = 31.75 to mel(16000) = 3574.9,
    # centre of bin i at 31.75 + (i + 1) * 27.47 -> 1000 Hz sits between the centres of bins 34 and 35
    assert int(out[100].argmax()) in (34, 35)


def test_resampling_from_any_rate(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1000, 2.0, sr=16_000).numpy(), 16_000)
    wave = read_clip(tmp_path / "a.wav")
    assert wave.numel() == 64_000  # 2 s at 32 kHz
    x = clip_features(tmp_path / "a.wav", None, None)
    assert x.shape == (1, 512, 128) and int(x[0, 50].argmax()) in (34, 35)
    part = read_clip(tmp_path / "a.wav", 0.5, 1.5)
    assert part.numel() == 32_000


@pytest.mark.parametrize("events,duration,expected", [
    ([(7.0, 8.0)], 20.0, (5.0, 10.0)),       # centred on the event
    ([(0.5, 1.0)], 20.0, (0.0, 5.0)),        # shifted right to stay inside
    ([(19.5, 19.9)], 20.0, (15.0, 20.0)),    # shifted left
    ([(1.0, 2.0), (12, 13)], 20.0, (0.0, 5.0)),  # the first event
    ([], 20.0, (0.0, 5.0)),                  # no event: the start
    ([(1.0, 2.0)], 3.0, (0.0, 3.0)),         # shorter than a window: all of it
])
def test_event_window(events, duration, expected):
    assert event_window(events, duration) == pytest.approx(expected)


def test_sliding_windows():
    assert sliding_windows(12.0) == [(0.0, 5.0), (5.0, 10.0)]          # a 2 s rest is dropped
    assert sliding_windows(13.0) == [(0.0, 5.0), (5.0, 10.0), (10.0, 13.0)]  # a 3 s rest is kept
    assert sliding_windows(10.0, hop_s=2.5) == [(0.0, 5.0), (2.5, 7.5), (5.0, 10.0)]
    with pytest.raises(AudioError, match="short.wav.*shorter than one 5 s window"):
        sliding_windows(3.0, source="short.wav")


def test_bad_audio_names_the_file(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(32_000, dtype=np.float32), 32_000)
    with pytest.raises(AudioError, match="silent.wav: silent"):
        read_clip(tmp_path / "silent.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF....junk")
    with pytest.raises(AudioError, match="junk.wav"):
        read_clip(tmp_path / "junk.wav")
    sf.write(tmp_path / "short.wav", tone(500, 1.0).numpy(), 32_000)
    with pytest.raises(AudioError, match="short.wav: window 2.0-7.0 s lies outside"):
        read_clip(tmp_path / "short.wav", 2.0, 7.0)
    with pytest.raises(AudioError, match="too short"):
        fbank_birdmae(torch.ones(100), source="tiny")
    assert BirdFbankConfig().to_dict()["frontend"] == "fbank_birdmae"


def test_a_short_clip_is_zero_padded_as_audio_before_the_fbank():
    """Bird-MAE's feature extractor pads the waveform with zeros to 5 s (then removes the DC offset
    and takes the fbank); the former convention padded the short clip's own fbank with its minimum."""
    g = torch.Generator().manual_seed(1)
    w = 0.1 * torch.randn(32_000, generator=g) + 0.02  # 1 s at 32 kHz
    padded = torch.cat([w, torch.zeros(128_000)])
    ref = kaldi.fbank((padded - padded.mean())[None], htk_compat=True, sample_frequency=32_000, use_energy=False,
                      window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25)
    assert ref.shape == (498, 128)
    out = fbank_birdmae(w)
    assert torch.allclose(out[:498], (ref + 7.2) / 8.86, atol=1e-5)
    assert torch.allclose(out[498:], torch.full((14, 128), (float(ref.min()) + 7.2) / 8.86), atol=1e-5)
    # frame 100 (1.0-1.025 s) straddles the clip's end: real audio then zeros, not the clip minimum
    old = fbank_birdmae(w, BirdFbankConfig(pad="fbank_min"))
    own = kaldi.fbank((w - w.mean())[None], htk_compat=True, sample_frequency=32_000, use_energy=False,
                      window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25)
    assert own.shape == (98, 128) and torch.allclose(old[:98], (own + 7.2) / 8.86, atol=1e-5)
    assert torch.allclose(old[98:], torch.full((414, 128), (float(own.min()) + 7.2) / 8.86), atol=1e-5)
    assert not torch.allclose(out[98:200], old[98:200], atol=0.1)
    # a longer clip is cut to 5 s of audio first: 498 frames of it, then the minimum
    long = 0.1 * torch.randn(224_000, generator=g)
    assert torch.allclose(fbank_birdmae(long), fbank_birdmae(long[:160_000]))


def test_the_padding_is_part_of_the_preprocessing_and_old_bundles_keep_theirs():
    assert BirdFbankConfig().to_dict()["pad"] == "waveform"
    assert BirdFbankConfig().to_dict() != BirdFbankConfig(pad="fbank_min").to_dict()  # another feature cache key
    old = {k: v for k, v in BirdFbankConfig().to_dict().items() if k != "pad"}  # a bundle saved before `pad`
    assert BirdFbankConfig.from_dict(old).pad == "fbank_min"
    assert BirdFbankConfig.from_dict(BirdFbankConfig().to_dict()) == BirdFbankConfig()
    with pytest.raises(ValueError, match="pad must be one of"):
        BirdFbankConfig(pad="zeros")
