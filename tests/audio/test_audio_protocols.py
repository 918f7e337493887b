"""metrics.json names the evaluation protocol a run used (ESC-50 / UrbanSound8K fold protocols)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shared.cli import STAGE_ENV

RECIPES = Path(__file__).resolve().parents[2] / "domains" / "audio"
TINY_AST = "{max_length: 32, num_mel_bins: 128, hidden_size: 32, layers: 2, heads: 4}"


@pytest.fixture(autouse=True)
def _clean_stage_env():
    saved = os.environ.pop(STAGE_ENV, None)
    yield
    os.environ.pop(STAGE_ENV, None)
    if saved is not None:
        os.environ[STAGE_ENV] = saved


def _run(root: Path, tmp_path: Path, *extra: str) -> dict:
    from audio.train import main

    out = tmp_path / "run"
    main(["--config", str(RECIPES / "data" / "esc50.yaml"), "--config", str(RECIPES / "methods" / "linear.yaml"),
          "--model.backbone", "tiny-ast", "--model.backbone_kwargs", TINY_AST, "--data.root", str(root),
          "--data.target_frames", "32", "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"),
          "--trainer.max_epochs", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--output_dir", str(out),
          *extra])
    return json.loads((out / "metrics.json").read_text())


def test_metrics_json_names_the_petl_ast_protocol(esc50, tmp_path):
    row = _run(esc50, tmp_path)
    assert row["protocol"] == "petl-ast" and row["fold"] == 1
    assert row["best_checkpoint"] == "best.ckpt" and row["monitor"] == "val/acc"


def test_metrics_json_says_when_the_last_epoch_was_tested(esc50, tmp_path):
    row = _run(esc50, tmp_path, "--data.protocol", "official", "--data.val_fraction", "0")
    assert row["protocol"] == "official-last-epoch"
    assert row["best_checkpoint"] is None and row["monitor"] is None  # nothing was selected on validation
    assert 0.0 <= row["test/acc"] <= 1.0
