"""audio.explain (issue 17, items 14 and 21): evidence in the padding or above the input's Nyquist
frequency is flagged, warned about and shaded; a negative --start is refused; the picture goes
to runs/explain/ by default and reads on its own (Hz axis, colour bar, legend, no overlapping labels).

The bundle is a tiny prototypical probe built like audio.probe builds one (its `make_heads`, the
tiny Bird-MAE architecture, `peft.save` with the frontend's preprocessing), without training:
two prototypes are set to the backbone's own features at chosen patches, so where they fire is
known: class "short" at the last time patch of a 0.1 s clip (padding), class "narrow" at mel
patch 6 (8-11 kHz) of an 8 kHz recording (above its 4 kHz Nyquist frequency)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
import soundfile as sf
import torch

from audio.birds import explain
from audio.birds.frontend import BirdFbankConfig, clip_features
from audio.birds.probe import make_heads
from shared import backbones, peft
from shared.cli import friendly

KW = {"embed_dim": 16, "depth": 1, "num_heads": 2}
LABELS = ["short", "narrow"]


def _write_clips(root):
    rng = np.random.default_rng(0)
    t = np.arange(int(0.1 * 32_000)) / 32_000
    sf.write(root / "short.wav", (0.5 * np.sin(2 * np.pi * (2000 + 20_000 * t) * t)).astype(np.float32), 32_000)
    t8 = np.arange(5 * 8_000) / 8_000  # 5 s at 8 kHz: a 1 kHz tone and noise, nothing above 4 kHz
    sf.write(root / "narrow.wav", (0.3 * np.sin(2 * np.pi * 1000 * t8) + 0.05 * rng.standard_normal(t8.size))
             .astype(np.float32), 8_000)
    t32 = np.arange(7 * 32_000) / 32_000  # 7 s at 32 kHz: two windows
    sf.write(root / "long.wav", (0.3 * np.sin(2 * np.pi * 3000 * t32) + 0.05 * rng.standard_normal(t32.size))
             .astype(np.float32), 32_000)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    _write_clips(root)
    cfg = BirdFbankConfig()
    backbone = peft.attach(backbones.create("tiny-bird-mae", **KW).eval(), [], backbone_id="tiny-bird-mae")
    head = make_heads(["prototypical"], KW["embed_dim"], len(LABELS), prototypes_per_class=2)["prototypical"]
    clf = peft.Classifier(backbone, head, labels=LABELS).eval()
    with torch.no_grad():
        head.prototypes.zero_()
        head.bias.fill_(2.0)  # both classes predicted
        for c, (clip, (t, f)) in enumerate([("short.wav", (31, 0)), ("narrow.wav", (10, 6))]):
            fmap = head.feature_map(clf.tokens(clip_features(root / clip, None, None, cfg)[None]))  # (1, D, 32, 8)
            head.prototypes[c * head.prototypes_per_class] = fmap[0, :, t, f]
    path = peft.save(clf, root / "adapter", labels=LABELS, preprocessing=cfg.to_dict(), backbone_id="tiny-bird-mae",
                     backbone_kwargs=KW, extra={"task": "multilabel"}, domain="bioacoustic")
    return root, path


def _rows(printed: str, cls: str) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith("| ") and f"| {cls} |" in line]


def test_short_clip_evidence_in_the_padding_is_flagged_warned_and_written_under_runs(bundle, tmp_path, monkeypatch,
                                                                                       capsys):
    root, adapter = bundle
    monkeypatch.chdir(tmp_path)
    assert explain.main(["--adapter", str(adapter), str(root / "short.wav"), "--threshold", "0"]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "runs" / "explain" / "explain_short.png").stat().st_size > 10_000
    assert not (tmp_path / "explain_short.png").exists()  # no longer written into the current folder
    assert f"picture: {'runs/explain/explain_short.png'}" in out
    short = _rows(out, "short")
    assert short and "in the padding (no audio)" in short[0]  # the prototype set at 4.96-5.12 s
    t0, t1 = map(float, short[0].split("|")[8].strip().split("-"))
    assert 4.96 - 1e-6 <= t0 < t1 <= 5.12 + 1e-6
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "padding" in warnings[0] and "0.10-5.12 s" in warnings[0]
    assert "Nyquist" not in err  # a 32 kHz input has every band


def test_8khz_input_evidence_above_nyquist_is_flagged_and_warned(bundle, tmp_path, capsys):
    root, adapter = bundle
    png = tmp_path / "chosen" / "n.png"
    assert explain.main(["--adapter", str(adapter), str(root / "narrow.wav"), "--threshold", "0",
                         "--output", str(png)]) == 0
    out, err = capsys.readouterr()
    assert png.stat().st_size > 10_000  # --output keeps choosing the file
    narrow = _rows(out, "narrow")
    lo, hi = map(int, narrow[0].split("|")[9].strip().split("-"))
    assert lo > 4000 and "above the input's Nyquist (4000 Hz): no energy" in narrow[0]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert [w for w in warnings if "Nyquist" in w] == [w for w in warnings if "4000 Hz" in w and "8000 Hz input" in w]
    assert len([w for w in warnings if "Nyquist" in w]) == 1
    # rows below 4 kHz carry no Nyquist flag
    for line in out.splitlines():
        if line.startswith("| ") and line.split("|")[9].strip()[:1].isdigit():
            lo = int(line.split("|")[9].strip().split("-")[0])
            hi = int(line.split("|")[9].strip().split("-")[1])
            assert ("Nyquist" in line) == ((lo + hi) / 2 > 4000)


def test_negative_start_is_refused_in_one_line_with_exit_2(bundle, tmp_path, monkeypatch, capsys):
    root, adapter = bundle
    monkeypatch.chdir(tmp_path)
    assert friendly(explain.main, ["--adapter", str(adapter), str(root / "long.wav"), "--start", "-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --start must be a time in the clip, >= 0 seconds; got -2"]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_explain_rows_flag_padding_and_nyquist_by_their_cells():
    from types import SimpleNamespace

    from shared.heads import PrototypicalHead, Tokens

    d = 8
    x = torch.zeros(1 + 32 * 8, d)
    x[1:, 0] = 1.0
    x[1 + 31 * 8 + 7] = torch.tensor([0.0, 1.0] + [0.0] * (d - 2))  # time patch 31 (4.96-5.12 s), mel patch 7
    head = PrototypicalHead(d, num_classes=1, prototypes_per_class=1, focal=True, upsample=2)
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[0.0, 1.0] + [0.0] * (d - 2)]))
    clf = SimpleNamespace(head=head, tokens=lambda inp: Tokens(x[None], 1, (32, 8)))
    (row,) = explain.explain(clf, torch.zeros(1, 512, 128), ["bird"], audio_s=3.0, nyquist=4000.0)
    assert row["flags"] == [explain.PADDING, explain.NYQUIST] and row["hz"][0] > 8000
    (row,) = explain.explain(clf, torch.zeros(1, 512, 128), ["bird"], audio_s=5.12, nyquist=None)
    assert row["flags"] == []
    assert "| 1 | bird |" in explain.table([row]) and explain.table([row]).rstrip().endswith("| - |")


def test_frequency_axis_is_in_hz_on_kaldis_mel_scale():
    from torchaudio.compliance.kaldi import get_mel_banks

    _, centres = get_mel_banks(128, 1024, 32_000.0, 20.0, 0.0, 100.0, -500.0, 1.0)  # kaldi's own bin centres
    ours = torch.tensor([explain.bin_to_hz(i + 0.5) for i in range(128)])
    assert torch.allclose(ours, centres.flatten(), rtol=1e-4)
    for hz in (100, 1000, 4000, 15_000):
        assert explain.bin_to_hz(explain.hz_to_bin(hz)) == pytest.approx(hz)


def _figure(rows, **kw):
    return explain.figure(torch.randn(1, 512, 128), rows, "clip.wav, 0.00-5.12 s: bird", **kw)


def _row(i, t0, f0, cls="bird", flags=()):
    return {"class": cls, "prototype": i, "similarity": 0.5, "share": 0.3, "t_start": t0, "t_end": t0 + 0.08,
            "mel_bins": (f0, f0 + 8), "flags": list(flags)}


def test_picture_reads_on_its_own_hz_axis_colour_bar_legend_and_no_overlapping_labels():
    # crowded on purpose: neighbouring cells and two rows on one cell
    rows = [_row(0, 1.00, 40), _row(1, 1.08, 40), _row(2, 1.16, 40), _row(3, 1.00, 48, "frog"), _row(4, 1.00, 40, "frog"),
            _row(5, 4.00, 120), _row(6, 4.08, 120, flags=[explain.PADDING])]
    fig = _figure(rows, audio_s=4.5, nyquist=4000.0)
    try:
        ax, cbar = fig.axes[0], fig.axes[1]
        assert ax.get_ylabel() == "frequency (Hz, mel scale)" and ax.get_xlabel() == "time (s)"
        assert cbar.get_ylabel() == "log-mel energy (normalised)"
        ticks = [t.get_text() for t in ax.get_yticklabels()]
        assert ticks == ["50", "250", "500", "1k", "2k", "4k", "8k"]
        assert ax.get_title().startswith("clip.wav")
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend[0] == "1: bird #0, sim 0.50, 30% of the class"
        assert legend[6].endswith("[padding]")
        assert "padding (no audio)" in legend and "above the input's Nyquist (4k Hz): no energy" in legend
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        labels = [t for t in ax.texts if t.get_text()[:1].isdigit()]
        assert sorted(t.get_text() for t in labels) == ["1,5", "2", "3", "4", "6", "7"]  # one label per cell
        boxes = [t.get_window_extent(r) for t in labels]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), "patch labels overlap"
    finally:
        matplotlib.pyplot.close(fig)


def test_picture_without_padding_or_missing_band_has_no_shading():
    fig = _figure([_row(0, 1.0, 40)], audio_s=5.12, nyquist=None)
    try:
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == ["1: bird #0, sim 0.50, 30% of the class"]
        assert not any(math.isclose(p.get_alpha() or 0, 0.35) for p in fig.axes[0].patches)
    finally:
        matplotlib.pyplot.close(fig)
