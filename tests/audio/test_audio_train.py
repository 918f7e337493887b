"""audio.train: the demo CLI end to end on a tiny synthetic ESC-50-layout dataset."""
from __future__ import annotations

import json
import os

import pytest

from shared.cli import STAGE_ENV


@pytest.fixture
def data(tmp_path):
    from audio.synthetic import write_esc50_like

    return write_esc50_like(tmp_path / "esc50", num_classes=3, clips_per_fold=2, seconds=1.0)


@pytest.fixture(autouse=True)
def _clean_stage_env():
    # A failed run leaks PEFT_SUITE_STAGE_DIR (see test_failed_run_leaves_no_staging_folder):
    # never let it reach the next test, in this file or any other.
    saved = os.environ.pop(STAGE_ENV, None)
    yield
    os.environ.pop(STAGE_ENV, None)
    if saved is not None:
        os.environ[STAGE_ENV] = saved


def args(tmp_path, data, *extra):
    return ["--output_dir", str(tmp_path / "run"), "--data.init_args.root", str(data),
            "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "1",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", *extra]


def test_demo_run_writes_metrics_and_bundle(tmp_path, data):
    from audio.train import main

    row = main(args(tmp_path, data))
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(row, default=str))
    assert metrics["dataset"] == "esc50" and metrics["fold"] == 1 and metrics["backbone"] == "tiny-ast"
    assert metrics["method"] == "adapter(bottleneck,ffn,parallel)"
    assert 0.0 <= metrics["test/acc"] <= 1.0 and "test/auroc" in metrics
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["best_checkpoint"] == "best.ckpt"
    bundle = run / "adapter"
    assert (bundle / "adapter.safetensors").stat().st_size > 0
    meta = json.loads((bundle / "adapter.json").read_text())
    text = json.dumps(meta)
    # the bundle records the labels and the frontend it was trained with
    for name in ("tone", "chirp", "noise_bursts"):
        assert name in text
    assert '"target_frames": 200' in text and "fbank_ast" in text
    # features were cached where we asked, the staging folder was moved, nothing left behind
    assert list((tmp_path / "cache").glob("*.npy"))
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert STAGE_ENV not in os.environ


@pytest.mark.parametrize("override", [["--model.backbone_kwargs.max_length", "100"],
                                      ["--data.init_args.target_frames", "100"]])
def test_frame_count_mismatch_is_a_clear_error(tmp_path, data, override):
    from audio.train import main

    with pytest.raises(ValueError, match=r"max_length=\d+ but the data frontend produces \d+ frames"):
        main(args(tmp_path, data, *override))
    assert not (tmp_path / "run").exists()


def test_failed_run_leaves_no_staging_folder(tmp_path, data):
    """Regression (shared/cli.py run(): `describe(model, data)` and `peft.summary` ran before the
    `try:` that removes the staging folder and pops PEFT_SUITE_STAGE_DIR). When
    audio.train.check_frames raises, a `.run.staging-*` folder is left next to output_dir and the
    env var stays set, so the NEXT run in the same process (notebook, sweep, test session)
    reuses that stale folder: it stages into the failed run's directory."""
    from audio.train import main

    with pytest.raises(ValueError):
        main(args(tmp_path, data, "--data.init_args.target_frames", "100"))
    assert STAGE_ENV not in os.environ
    assert not [p.name for p in tmp_path.iterdir() if ".staging-" in p.name]


@pytest.mark.parametrize("form", ["equals", "short_key"])
def test_demo_writes_data_where_the_root_flag_says(tmp_path, monkeypatch, form):
    """Regression (audio/train.py main() once read only `--data.init_args.root PATH`).
    The demo only recognises the exact two-token form `--data.init_args.root PATH`. With
    `--data.init_args.root=PATH` (ordinary argparse syntax) or `--data.root PATH` (which the CLI
    accepts, and shared/cli.py's docstring advertises) it writes the synthetic data to the demo
    recipe's default root (relative to the cwd) and the run then fails with
    "dataset folder not found" for PATH. Fix: parse the root with the CLI's own parser, or
    accept `--data.init_args.root=`, `--data.root` and `--data.root=` as well."""
    import audio.train as train

    monkeypatch.setitem(train.DEMO_DATA, "clips_per_fold", 2)
    monkeypatch.setitem(train.DEMO_DATA, "num_classes", 3)
    monkeypatch.setitem(train.DEMO_DATA, "seconds", 1.0)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "fresh_data"
    root_args = ([f"--data.init_args.root={data}"] if form == "equals" else ["--data.root", str(data)])
    argv = ["--output_dir", str(tmp_path / "run"), *root_args,
            "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "1",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]
    try:
        train.main(argv)
    finally:
        written_to_default = (tmp_path / "runs").exists()
    assert (data / "meta" / "esc50.csv").is_file()
    assert not written_to_default
    assert (tmp_path / "run" / "metrics.json").is_file()
