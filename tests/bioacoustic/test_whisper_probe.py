"""audio.probe / audio.explain on a Whisper encoder (issue 20, item 6): tokens are 20 ms time steps with
no frequency axis, so the prototypical probe's prototypes live over time and explanations are time spans.

The end-to-end test runs the real recipe `domains/bioacoustic/fsdd_tiny_whisper.yaml` (a tiny random
`WhisperEncoder`, Whisper's log-mel frontend, the FSDD soundscape mixer) on generated 8 kHz "FSDD"
recordings (each digit a tone pair of its own pitch), so it needs neither the data nor the weights."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audio.birds.frontend import BirdWhisperConfig, clip_features, config_from_dict, frontend_config
from shared.heads import PrototypicalHead, Tokens

RECIPES = Path(__file__).resolve().parents[2] / "domains" / "bioacoustic"
TINY = RECIPES / "fsdd_tiny_whisper.yaml"


def _write_recordings(root: Path, speakers=("alice", "bob", "theo")) -> Path:
    """10 digits x 3 speakers, one 0.4-0.6 s take each, 8 kHz like FSDD: digit d is a tone at 300 + 250 d Hz
    with its octave, each speaker a little higher or lower."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for k, speaker in enumerate(speakers):
        for d in range(10):
            n = int(8_000 * rng.uniform(0.4, 0.6))
            t = np.arange(n) / 8_000
            f = (300 + 250 * d) * (1 + 0.03 * (k - 1))
            x = (np.sin(2 * np.pi * f * t) + 0.4 * np.sin(4 * np.pi * f * t)) * np.hanning(n)
            sf.write(root / f"{d}_{speaker}_0.wav", (0.5 * x + 0.01 * rng.standard_normal(n)).astype(np.float32),
                     8_000)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One probe run of the tiny-whisper recipe: (tmp, args, rows, printed)."""
    import io
    from contextlib import redirect_stdout

    from audio.birds import probe

    tmp = tmp_path_factory.mktemp("whisper_probe")
    recordings = _write_recordings(tmp / "recordings")
    args = ["--config", str(TINY), "--output_dir", str(tmp / "out"), "--cache_dir", str(tmp / "cache"),
            "--data.recordings", str(recordings), "--data.root", str(tmp / "mix"), "--data.test_speakers", "[theo]",
            "--data.soundscapes", "2", "--data.few_shot", "1", "--epochs", "2", "--prototypes_per_class", "2",
            "--time_recompute", "false"]
    buf = io.StringIO()
    with redirect_stdout(buf):
        rows = probe.main(args)
    return tmp, args, rows, buf.getvalue()


def test_tiny_whisper_probe_runs_on_time_tokens_and_reads_its_cache(run, capsys):
    from audio.birds import probe

    tmp, args, rows, printed = run
    assert set(rows) == {"linear", "attentive", "prototypical"}
    assert "computed on cpu and cached" in printed and "a Whisper encoder with RANDOM weights" in printed
    for kind, row in rows.items():
        saved = json.loads((tmp / "out" / kind / "metrics.json").read_text())
        assert 0.0 <= saved["test/cmap"] <= 1.0 and 0.0 <= saved["test/auroc"] <= 1.0 and 0.0 <= saved["test/top1"] <= 1.0
        bundle = json.loads((tmp / "out" / kind / "adapter" / "adapter.json").read_text())
        assert bundle["preprocessing"] == {"frontend": "whisper_logmel", "target_frames": 500, "num_mel_bins": 80,
                                           "sample_rate": 16_000, "window_s": 5.0}
    proto = rows["prototypical"]
    assert proto["conventions"]["prototype_axes"] == "time" and proto["conventions"]["focal"] is False
    assert proto["trainable_params"] == 10 * 2 * 32 + 10 * 2 + 10  # prototypes (d_model 32), weights, biases
    # 10 focal clips (1 per digit) + 2 soundscapes x two 5 s windows, cached once: (N, 250 tokens, 32)
    cached = sorted((tmp / "cache").glob("*.safetensors"))
    assert len(cached) == 2
    from safetensors.torch import load_file

    shapes = sorted(tuple(load_file(f)["features"].shape) for f in cached)
    assert shapes == [(4, 250, 32), (10, 250, 32)]
    again = probe.main(args + ["--output_dir", str(tmp / "again")])
    assert "read from the cache" in capsys.readouterr().out
    assert again["prototypical"]["test/cmap"] == pytest.approx(proto["test/cmap"])


def test_prototype_maps_of_whisper_tokens_run_over_time(run):
    from shared import peft

    tmp, _, _, _ = run
    clf = peft.from_bundle(tmp / "out" / "prototypical" / "adapter").eval()
    meta = json.loads((tmp / "out" / "prototypical" / "adapter" / "adapter.json").read_text())
    cfg = config_from_dict(meta["preprocessing"])
    assert isinstance(cfg, BirdWhisperConfig)
    x = clip_features(tmp / "mix" / "soundscapes" / "mix_000.wav", 5.0, 10.0, cfg)
    assert x.shape == (80, 500)  # (mels, frames): 5 s of 10 ms frames
    with torch.no_grad():
        tokens = clf.tokens(x[None])
        maps = clf.head.similarity_maps(tokens)
    assert tokens.x.shape == (1, 250, 32) and tokens.grid == (250, 1) and tokens.num_prefix == 0
    assert maps.shape == (1, 10, 2, 250, 1)  # one cell per 20 ms token: time length = token count
    assert torch.allclose(maps.flatten(3).amax(-1), clf.head.similarities(tokens))


def test_explain_shows_time_spans_inside_the_window(run, capsys):
    from audio.birds import explain

    tmp, _, _, _ = run
    png = tmp / "ex.png"
    clip = tmp / "mix" / "soundscapes" / "mix_001.wav"
    assert explain.main(["--adapter", str(tmp / "out" / "prototypical" / "adapter"), str(clip), "--start", "5",
                         "--output", str(png), "--threshold", "0", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert png.stat().st_size > 10_000
    header = next(line for line in out.splitlines() if line.startswith("| # |"))
    assert header.endswith("| time (s) | note |") and "frequency" not in header
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| # |")]
    assert len(rows) == 2 * 10  # --threshold 0: every digit predicted, its two prototypes (similarity > 0)
    for line in rows:
        t0, t1 = map(float, line.split("|")[8].strip().split("-"))
        assert 5.0 - 1e-9 <= t0 < t1 <= 10.0 + 1e-9 and t1 - t0 == pytest.approx(0.02, abs=1.1e-3)  # one token


def test_explanation_locates_the_matching_token_in_time():
    """A prototype equal to token 100 of 250 fires there: 2.00-2.02 s after the window start, with no
    frequency band; x2 upsampling along time keeps the span inside that token."""
    from types import SimpleNamespace

    from audio.birds.explain import explain, table

    d = 8
    x = torch.zeros(250, d)
    x[:, 0] = 1.0
    x[100] = torch.tensor([0.0, 1.0] + [0.0] * (d - 2))
    cfg = BirdWhisperConfig()
    for up, cells in ((1, 250), (2, 500)):
        head = PrototypicalHead(d, num_classes=1, prototypes_per_class=1, focal=False, upsample=up)
        with torch.no_grad():
            head.prototypes.copy_(x[100:101])
            head.bias.fill_(0.0)
        tokens = Tokens(x[None], 0, (250, 1))
        assert head.similarity_maps(tokens).shape == (1, 1, 1, cells, 1)
        clf = SimpleNamespace(head=head, tokens=lambda inp: tokens)
        (r,) = explain(clf, torch.zeros(80, 500), ["digit"], threshold=0.5, window_start=3.0, frontend=cfg)
        assert r["hz"] is None and r["mel_bins"] is None and r["flags"] == []
        assert 3.0 + 2.0 - 1e-6 <= r["t_start"] < r["t_end"] <= 3.0 + 2.02 + 1e-6
        assert r["t_end"] - r["t_start"] == pytest.approx(0.02 / up)
        if up == 1:
            assert r["similarity"] == pytest.approx(1 / 1.01, abs=1e-6)
            assert "| 5.000-5.020 | - |" in table([r])
    # a match after a 1 s clip's audio lies in the padding
    (r,) = explain(clf, torch.zeros(80, 500), ["digit"], window_start=0.0, frontend=cfg, audio_s=1.0)
    assert r["flags"] == ["padding"]


@pytest.mark.parametrize("override, message", [
    (["--patch_layout", "birdmae_reshape"], "--patch_layout birdmae_reshape cannot apply: .* no frequency axis"),
    (["--focal_similarity", "true"], "--focal_similarity true cannot apply: .* no CLS token"),
    (["--backbone_kwargs.max_frames", "600"], "max_frames is 600 but data.init_args.target_frames is 500"),
    (["--data.frontend", "birdmae", "--data.target_frames", "null"], "set data.init_args.frontend: whisper"),
    (["--data.target_frames", "400", "--backbone_kwargs.max_frames", "400"], "covers 4 s, less than the 5 s window"),
])
def test_options_that_cannot_apply_to_whisper_tokens_fail_before_anything_is_written(tmp_path, override, message):
    from audio.birds import probe

    args = ["--config", str(TINY), "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
            "--data.recordings", str(tmp_path / "no_recordings"), "--data.root", str(tmp_path / "mix")]
    with pytest.raises(ValueError, match=message):
        probe.main(args + override)
    assert not (tmp_path / "out").exists() and not (tmp_path / "mix").exists()


def test_whisper_frontend_settings():
    cfg = frontend_config("whisper")
    assert cfg == BirdWhisperConfig(500) and cfg.window_s == 5.0
    wave = torch.randn(16_000)  # 1 s: zero-padded to the 5 s window, as Whisper pads
    x = cfg.compute(wave)
    from audio.whisper import WhisperMelConfig, logmel_whisper

    assert torch.equal(x, logmel_whisper(wave, WhisperMelConfig(500)))
    with pytest.raises(ValueError, match="pad: 'fbank_min' cannot apply to frontend: whisper"):
        frontend_config("whisper", pad="fbank_min")
    with pytest.raises(ValueError, match="target_frames applies to frontend: whisper only"):
        frontend_config("birdmae", target_frames=500)
    with pytest.raises(ValueError, match="frontend must be one of birdmae, whisper"):
        frontend_config("ast")
    assert math.isclose(config_from_dict({}).window_s, 5.0)  # a bundle without a frontend: Bird-MAE's fbank


def test_whisper_frequency_axis_is_in_hz_on_the_slaney_mel_scale():
    """The picture's rows are Whisper's 80 slaney filters from 0 to 8 kHz: row i's centre is filter i's
    peak (within one 40 Hz FFT bin of the filterbank transformers' extractor uses)."""
    from audio.birds import explain
    from audio.whisper import mel_filters

    fb = mel_filters(80, 16_000)  # (201 FFT bins, 80): torchaudio, equal to WhisperFeatureExtractor's
    peaks = fb.argmax(0).float() * 8_000 / 200
    ours = torch.tensor([explain.bin_to_hz(i + 0.5, 80, 0.0, 8_000.0, "slaney") for i in range(80)])
    assert (ours - peaks).abs().max() <= 40.0 + 1e-3
    assert explain.bin_to_hz(-0.5, 80, 0.0, 8_000.0, "slaney") == pytest.approx(0.0, abs=1e-9)
    assert explain.bin_to_hz(79.5 + 1, 80, 0.0, 8_000.0, "slaney") == pytest.approx(8_000.0)
    for hz in (100, 1000, 4000):
        assert explain.bin_to_hz(explain.hz_to_bin(hz, 80, 0.0, 8_000.0, "slaney"), 80, 0.0, 8_000.0,
                                 "slaney") == pytest.approx(hz)
