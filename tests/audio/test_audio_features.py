"""audio.features: the AST fbank frontend, audio reading, SpecAugment and the feature cache.

(Named test_audio_*.py so the basename never collides with another domain's test module under
pytest's default `prepend` import mode.)
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

import audio.features as af
from audio.features import AudioError, FbankCache, FbankConfig, SpecAugment, fbank_ast, features, read_audio


def hf_features(wave: torch.Tensor, max_length: int) -> torch.Tensor:
    from transformers import ASTFeatureExtractor

    fe = ASTFeatureExtractor(max_length=max_length)
    return fe(wave.numpy(), sampling_rate=16_000, return_tensors="pt")["input_values"][0]


def kaldi_frames(n: int) -> int:
    return (n - 400) // 160 + 1  # snip_edges: 25 ms window, 10 ms hop at 16 kHz


# --------------------------------------------------------------------------- fbank_ast == HF


@pytest.mark.parametrize("max_length", [100, 400, 500, 1024])
@pytest.mark.parametrize("n", [400, 7_777, 16_000, 80_000, 176_400])
def test_fbank_equals_hf_extractor(max_length, n):
    g = torch.Generator().manual_seed(n)
    t = torch.arange(n) / 16_000
    wave = (0.4 * torch.sin(2 * torch.pi * 440 * t) + 0.1 * torch.randn(n, generator=g)).float()
    wave[n // 3: n // 2] = 0.0  # a stretch of digital silence (log floor) inside the clip
    ours = fbank_ast(wave, FbankConfig(target_frames=max_length))
    ref = hf_features(wave, max_length)
    assert ours.shape == ref.shape == (max_length, 128)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    frames = kaldi_frames(n)
    if frames < max_length:  # zero-padded BEFORE normalisation, as HF does
        pad = (0.0 - af.AST_MEAN) / (2 * af.AST_STD)
        assert torch.allclose(ours[frames:], torch.full_like(ours[frames:], pad))
        assert not torch.allclose(ours[frames - 1], torch.full_like(ours[0], pad))


def test_fbank_of_pure_silence_is_finite_and_matches_hf():
    wave = torch.zeros(16_000)
    ours = fbank_ast(wave, FbankConfig(target_frames=128))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, hf_features(wave, 128), atol=1e-5, rtol=0)


def test_fbank_pads_less_than_one_frame_with_silence():
    """Clips shorter than one 25 ms window (very short UrbanSound8K slices) are zero-padded to one
    frame, as silence, instead of refused; only an empty clip is an error."""
    short = torch.randn(250) * 0.1
    got = fbank_ast(short, FbankConfig(target_frames=8))
    want = fbank_ast(torch.cat([short, torch.zeros(150)]), FbankConfig(target_frames=8))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(got[0], got[1])  # frame 0 is the clip, frames 1.. are padding
    with pytest.raises(AudioError, match="clip.wav.*empty"):
        fbank_ast(torch.zeros(0), source="clip.wav")


@pytest.mark.real
@pytest.mark.parametrize("max_length", [100, 400])
def test_fbank_equals_hf_on_real_speech(afx, max_length):
    wav = afx.FSDD / "recordings" / "0_george_0.wav"
    if not wav.is_file():
        pytest.skip(f"{wav} not available")
    assert sf.info(str(wav)).samplerate == 8_000
    wave = read_audio(wav)
    raw, sr = sf.read(str(wav), dtype="float32")
    expected = torchaudio.functional.resample(torch.from_numpy(raw), sr, 16_000)
    torch.testing.assert_close(wave, expected, atol=1e-6, rtol=0)
    ours = fbank_ast(wave, FbankConfig(target_frames=max_length), source=str(wav))
    torch.testing.assert_close(ours, hf_features(wave, max_length), atol=1e-5, rtol=0)
    # real speech: the frames that carry audio are not all padding, and not constant
    assert ours[: kaldi_frames(wave.numel())].std() > 0.1


# --------------------------------------------------------------------------- read_audio

ATOL = {"PCM_16": 3e-4, "PCM_24": 2e-6, "PCM_32": 2e-6, "FLOAT": 2e-6}


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
@pytest.mark.parametrize("channels", [1, 2, 6])
@pytest.mark.parametrize("sr", [8_000, 16_000, 22_050, 44_100, 48_000])
def test_read_audio_any_format_to_mono_16k(tmp_path, afx, sr, channels, subtype):
    p = tmp_path / f"clip_{sr}_{channels}_{subtype}.wav"
    x = afx.write_wav(p, seconds=0.3137, sr=sr, channels=channels, subtype=subtype, seed=sr + channels)
    n = x.shape[0]
    wave = read_audio(p)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(wave.numel() - round(n * 16_000 / sr)) <= 1
    mono = torch.from_numpy(x.reshape(n, -1).mean(axis=1).astype(np.float32))
    expected = mono if sr == 16_000 else torchaudio.functional.resample(mono, sr, 16_000)
    assert wave.numel() == expected.numel()
    torch.testing.assert_close(wave, expected, atol=ATOL[subtype], rtol=0)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
def test_read_audio_flac(tmp_path, afx, subtype):
    p = tmp_path / "clip.flac"
    x = afx.write_wav(p, seconds=0.5, sr=44_100, channels=2, subtype=subtype, fmt="FLAC")
    wave = read_audio(p)
    expected = torchaudio.functional.resample(torch.from_numpy(x.mean(axis=1)), 44_100, 16_000)
    assert wave.dtype == torch.float32 and wave.shape == expected.shape == (8_000,)
    torch.testing.assert_close(wave, expected, atol=ATOL[subtype], rtol=0)


# --------------------------------------------------------------------------- errors


def assert_names(err: pytest.ExceptionInfo, path) -> None:
    assert str(path) in str(err.value), f"message does not name the file: {err.value}"


def test_unreadable_file(tmp_path, afx):
    p = tmp_path / "noise.wav"
    afx.corrupt(p)
    with pytest.raises(AudioError, match="unreadable") as e:
        read_audio(p)
    assert_names(e, p)


def test_missing_file(tmp_path):
    p = tmp_path / "absent.wav"
    with pytest.raises(AudioError, match="not found") as e:
        read_audio(p)
    assert_names(e, p)


def test_empty_file_of_zero_bytes(tmp_path):
    p = tmp_path / "zero_bytes.wav"
    p.write_bytes(b"")
    with pytest.raises(AudioError) as e:
        read_audio(p)
    assert_names(e, p)


def test_empty_wav(tmp_path):
    p = tmp_path / "empty.wav"
    sf.write(str(p), np.zeros((0, 1), np.float32), 16_000, subtype="PCM_16")
    assert sf.info(str(p)).frames == 0
    with pytest.raises(AudioError, match="empty") as e:
        read_audio(p)
    assert_names(e, p)


def test_truncated_wav_is_refused_unless_allowed(tmp_path, afx):
    # A half-downloaded clip: its data chunk declares 64 000 bytes, 31 978 are present. It is
    # refused (naming the file and both sizes); allow_truncated reads the part that is there.
    full = tmp_path / "full.wav"
    afx.write_wav(full, seconds=1.0, sr=16_000, channels=2, subtype="PCM_16")
    data = full.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match=r"cut\.wav: truncated audio: .*data of 64,000 bytes but only 31,978"):
        read_audio(cut)
    with pytest.raises(AudioError, match="truncated"):
        features(cut, FbankConfig(target_frames=100))
    whole, part = read_audio(full), read_audio(cut, allow_truncated=True)
    assert 7_900 <= part.numel() <= 8_000  # half of 16 000 frames, less the 44-byte header
    assert torch.equal(part, whole[: part.numel()])
    assert features(cut, FbankConfig(target_frames=100), allow_truncated=True).shape == (100, 128)


def test_wav_cut_inside_its_header(tmp_path, afx):
    full = tmp_path / "full.wav"
    afx.write_wav(full, seconds=0.5)
    cut = tmp_path / "header_only.wav"
    cut.write_bytes(full.read_bytes()[:30])
    with pytest.raises(AudioError, match="unreadable") as e:
        read_audio(cut)
    assert_names(e, cut)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_wav_with_non_finite_samples(tmp_path, afx, bad):
    x = afx.tone(0.3, 16_000, 2)
    x[1234, 1] = bad
    p = tmp_path / "nan.wav"
    sf.write(str(p), x, 16_000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite") as e:
        read_audio(p)
    assert_names(e, p)


@pytest.mark.parametrize("sr,seconds", [(16_000, 0.02), (44_100, 0.024)])
def test_clip_shorter_than_one_frame_is_padded(tmp_path, afx, sr, seconds):
    p = tmp_path / "short.wav"
    afx.write_wav(p, seconds=seconds, sr=sr)
    wave = read_audio(p)
    assert 0 < wave.numel() < 400
    want = fbank_ast(torch.nn.functional.pad(wave, (0, 400 - wave.numel())), FbankConfig(target_frames=100))
    torch.testing.assert_close(FbankCache(tmp_path / "cache", FbankConfig(target_frames=100))(p), want)


def test_audio_error_is_a_value_error():
    assert issubclass(AudioError, ValueError)


# --------------------------------------------------------------------------- SpecAugment


def masked_rows_cols(x: torch.Tensor, y: torch.Tensor):
    """For (T, F) input x with no zeros and output y: the masked time frames and mel bins."""
    zero = y == 0
    assert torch.equal(y[~zero], x[~zero]), "unmasked values changed"
    t_masked = torch.nonzero(zero.all(dim=1)).flatten().tolist()
    f_masked = torch.nonzero(zero.all(dim=0)).flatten().tolist()
    union = torch.zeros_like(zero)
    union[t_masked, :] = True
    union[:, f_masked] = True
    assert torch.equal(zero, union), "zeros are not whole time frames / whole mel bins"
    return t_masked, f_masked


def contiguous(idx: list[int]) -> bool:
    return not idx or idx == list(range(idx[0], idx[0] + len(idx)))


def test_specaugment_masks_whole_rows_and_columns_with_bounded_width():
    aug = SpecAugment(freq_mask=24, time_mask=80).train()
    x = torch.rand(300, 128) + 1.0  # strictly positive: zeros in the output are masks
    widths_t, widths_f, changed = [], [], 0
    for seed in range(60):
        torch.manual_seed(seed)
        y = aug(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        t, f = masked_rows_cols(x, y)
        assert contiguous(t) and contiguous(f)
        # torchaudio: width = floor(U * mask_param) < mask_param, masked to the value 0.0
        assert len(t) < 80 and len(f) < 24
        widths_t.append(len(t))
        widths_f.append(len(f))
        changed += not torch.equal(x, y)
    assert changed >= 55
    assert max(widths_t) > 40 and max(widths_f) > 12  # masks really use their range
    assert (x > 0).all()  # the input itself is never masked in place


def test_specaugment_batched_and_eval_identity():
    aug = SpecAugment(freq_mask=24, time_mask=80)
    x = torch.rand(3, 200, 128) + 1.0
    aug.train()
    torch.manual_seed(0)
    y = aug(x)
    assert y.shape == x.shape
    for b in range(3):
        t, f = masked_rows_cols(x[b], y[b])
        assert len(t) < 80 and len(f) < 24
    aug.eval()
    assert aug(x) is x


def test_specaugment_disabled_axes():
    x = torch.rand(200, 128) + 1.0
    time_only, freq_only = SpecAugment(freq_mask=0, time_mask=80).train(), SpecAugment(24, 0).train()
    seen_t = seen_f = 0
    for seed in range(10):
        torch.manual_seed(seed)
        t, f = masked_rows_cols(x, time_only(x))
        assert f == []
        seen_t += len(t) > 0
        t, f = masked_rows_cols(x, freq_only(x))
        assert t == []
        seen_f += len(f) > 0
    assert seen_t >= 7 and seen_f >= 7
    assert torch.equal(SpecAugment(0, 0).train()(x), x)


# --------------------------------------------------------------------------- FbankCache


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = af.read_audio

    def spy(path, *a, **k):
        calls.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(af, "read_audio", spy)
    return calls


def npy_files(d):
    return sorted(d.glob("*.npy"))


def test_cache_hit_returns_identical_tensor_without_decoding(tmp_path, afx, counted):
    p = tmp_path / "a.wav"
    afx.write_wav(p, seconds=0.5, sr=44_100)
    cfg = FbankConfig(target_frames=100)
    cache = FbankCache(tmp_path / "cache", cfg)
    a = cache(p)
    assert counted == [str(p)] and (cache.hits, cache.misses) == (0, 1)
    b = cache(p)
    assert counted == [str(p)] and (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(a, b) and b.dtype == torch.float32 and b.shape == (100, 128)
    assert torch.equal(a, features(p, cfg))
    # a new cache object on the same folder (the next epoch / run) hits too
    c = FbankCache(tmp_path / "cache", cfg)(p)
    assert torch.equal(a, c) and len(counted) == 2  # only features() above decoded again
    assert len(npy_files(tmp_path / "cache")) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_recomputes_a_modified_file(tmp_path, afx, counted):
    p = tmp_path / "a.wav"
    afx.write_wav(p, seconds=0.5, seed=1)
    cache = FbankCache(tmp_path / "cache", FbankConfig(target_frames=100))
    a = cache(p)
    st = p.stat()
    afx.write_wav(p, seconds=0.5, seed=2)  # same size, different content
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    b = cache(p)
    assert len(counted) == 2 and cache.misses == 2
    assert not torch.equal(a, b)
    counted.clear()
    assert torch.equal(b, features(p, FbankConfig(target_frames=100)))


@pytest.mark.parametrize("damage", ["empty", "half", "garbage", "header"])
def test_cache_recomputes_a_corrupt_cache_file(tmp_path, afx, counted, damage):
    p = tmp_path / "a.wav"
    afx.write_wav(p, seconds=0.5)
    cache = FbankCache(tmp_path / "cache", FbankConfig(target_frames=100))
    good = cache(p)
    (f,) = npy_files(tmp_path / "cache")
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "half": data[: len(data) // 2], "garbage": np.random.bytes(500),
                   "header": data[:40]}[damage])
    again = cache(p)
    assert torch.equal(again, good)
    assert len(counted) == 2 and cache.misses == 2 and cache.hits == 0
    assert np.array_equal(np.load(f), good.numpy())  # the cache file was rewritten whole
    assert torch.equal(cache(p), good) and cache.hits == 1


def test_cache_key_includes_the_frontend_config(tmp_path, afx):
    p = tmp_path / "a.wav"
    afx.write_wav(p, seconds=0.5)
    root = tmp_path / "cache"
    a = FbankCache(root, FbankConfig(target_frames=100))(p)
    b = FbankCache(root, FbankConfig(target_frames=200))(p)
    c = FbankCache(root, FbankConfig(target_frames=100, mean=0.0))(p)
    assert a.shape == (100, 128) and b.shape == (200, 128) and c.shape == (100, 128)
    assert not torch.allclose(a, c)
    assert len(npy_files(root)) == 3


def test_cache_on_a_missing_file_raises_audio_error(tmp_path):
    """Regression (FbankCache._file once ran `path.stat()` before `read_audio`): a
    clip that the metadata lists but the disk lacks raises FileNotFoundError, not AudioError;
    `skip_bad_files=True` then crashes instead of skipping it."""
    p = tmp_path / "absent.wav"
    with pytest.raises(AudioError) as e:
        FbankCache(tmp_path / "cache", FbankConfig(target_frames=100))(p)
    assert_names(e, p)
