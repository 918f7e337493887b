"""vision.train: SIGTERM stops a run with status 143 and keeps the previous results; --resume continues it
from the last.ckpt (model, optimizer, scheduler, loops, RNG) to the metrics of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal

import pytest

import shared.cli as cli
from shared.cli import STAGE_ENV
from vision import train
from vision.synthetic import write_pascal_context_like

TINY = ["--model.backbone", "tiny-swin", "--model.backbone_kwargs", "{img_size: 32}", "--data.size", "32",
        "--data.batch_size", "2", "--model.decoder_width", "8", "--trainer.max_epochs", "3",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.tasks", "[semseg, normals]",
        "--model.methods", "[{name: lora, r: 2}]"]


@pytest.fixture(autouse=True)
def _no_inherited_stage():
    saved = os.environ.pop(STAGE_ENV, None)
    yield
    if saved is not None:
        os.environ[STAGE_ENV] = saved


def test_stopped_run_resumes_to_the_uninterrupted_metrics(tmp_path, monkeypatch, capsys):
    data = write_pascal_context_like(tmp_path / "PASCAL_MT", train=6, val=2, size=32, seed=3)
    base = ["--data.root", str(data), *TINY]
    train.main([*base, "--output_dir", str(tmp_path / "whole")])
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "metrics.json").write_text("previous")
    line = cli.EpochLine.on_train_epoch_end

    def stop_after_first(self, trainer, pl_module):
        line(self, trainer, pl_module)
        if trainer.current_epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli.EpochLine, "on_train_epoch_end", stop_after_first)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*base, "--output_dir", str(cut)])
    assert e.value.code == 143
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM: {cut} was left as it was" in err and err.strip().endswith("--resume")
    assert (cut / "metrics.json").read_text() == "previous"
    (stage,) = tmp_path.glob(".cut.staging-*")
    assert (stage / "last.ckpt").is_file()

    monkeypatch.undo()
    train.main([*base, "--output_dir", str(cut), "--resume"])
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed["test"].keys() == whole["test"].keys()
    for task, m in whole["test"].items():
        for k, v in m.items():
            assert resumed["test"][task][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (task, k)
    assert {**resumed["config"], "output_dir": None} == {**whole["config"], "output_dir": None}
    log = (cut / "train.log").read_text()
    assert "resumed after epoch 1/3" in log and "epoch 3/3" in log
    assert not list(tmp_path.glob(".cut.*")) and not (cut / "last.ckpt").exists()


def test_resume_with_nothing_to_resume_exits_2(tmp_path, capsys):
    data = write_pascal_context_like(tmp_path / "PASCAL_MT", train=2, val=1, size=32, seed=3)
    with pytest.raises(SystemExit) as e:
        train.main(["--data.root", str(data), *TINY, "--output_dir", str(tmp_path / "run"), "--resume"])
    assert e.value.code == 2 and "nothing to resume" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PASCAL_MT"]
