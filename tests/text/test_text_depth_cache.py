"""`python -m text.train` with the depth cache: the token tagger trained from cached hidden states of its
top layers reaches the same numbers as the normal path (fp32 storage, same seed, no dropout in the tiny BERT)."""
from __future__ import annotations

import json

import pytest

from text.train import main as train_main

LORA_TOP = "[{name: lora, r: 8, alpha: 16, targets: 'encoder\\.layer\\.(1|2)\\.attention\\.self\\.(query|value)'}]"


@pytest.mark.slow
def test_tagger_trains_from_the_depth_cache_like_the_normal_path(tmp_path, capsys):
    rows = {}
    for mode in ("off", "fp32"):
        rows[mode] = train_main(["--data.root", str(tmp_path / "data"), "--output_dir", str(tmp_path / mode),
                                 "--model.backbone_kwargs", "{hidden_size: 64, layers: 3, heads: 4, vocab_size: 1024}",
                                 "--model.methods", LORA_TOP, "--model.depth_cache", mode,
                                 "--model.depth_cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "2"])
    out = capsys.readouterr().out
    assert "depth cache: training blocks 1-2 + final norm + head" in out
    for key in ("test/loss", "test/f1", "test/macro_f1", "test/accuracy"):
        assert rows["fp32"][key] == pytest.approx(rows["off"][key], abs=1e-5), key
    logs = [json.loads((tmp_path / m / "metrics.json").read_text())["config"]["model"]["depth_cache"] for m in rows]
    assert logs == ["off", "fp32"]
