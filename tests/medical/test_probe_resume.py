"""`python -m medical.probe --resume`: a run stopped by SIGTERM continues the linear grid from the last.ckpt
its staging folder kept (after its last finished epoch) into the same output folder, to the results of an
uninterrupted run; `--resume` with nothing to resume is one line and exit status 2 (docs/operations.md)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medical import probe
from medical.synthetic import write_image_folder
from shared.cli import STAGE_ENV, friendly
from shared.resume import LoopCheckpoint

RECIPES = Path(__file__).resolve().parents[2] / "domains" / "medical"
TINY = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 4, num_heads: 4, reg_tokens: 4}"


@pytest.fixture(autouse=True)
def _no_inherited_stage(monkeypatch):
    monkeypatch.delenv(STAGE_ENV, raising=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("med") / "images", per_class={"train": 8, "val": 4, "test": 4},
                              size=32)


def _args(images, out, cache, *extra):
    return ["--config", str(RECIPES / "probe_demo.yaml"), "--data.root", str(images), "--data.img_size", "32",
            "--backbone_kwargs", TINY, "--ks", "[3, 5]", "--epochs", "4", "--batch_size", "4",
            "--cache_dir", str(cache), "--output_dir", str(out), *extra]


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stopped_probe_run_resumes_to_the_uninterrupted_results(signum, status, images, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    whole = probe.run(_args(images, tmp_path / "whole", cache))

    cut = tmp_path / "cut"
    (cut / "linear").mkdir(parents=True)
    (cut / "linear" / "metrics.json").write_text("previous")
    save, units = LoopCheckpoint.save, []

    def stop_after_epoch_2(self, state):  # the scheduler's SIGTERM (or a Ctrl-C) between two epochs of the grid
        save(self, state)
        units.append(state["epochs_done"])
        if len(units) == 2:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(LoopCheckpoint, "save", stop_after_epoch_2)
    capsys.readouterr()
    assert friendly(probe.main, _args(images, cut, cache)) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stopped by {signal.Signals(signum).name}: {cut} was left as it was")
    assert err[0].endswith(" --resume") and units == [1, 2]
    assert (cut / "linear" / "metrics.json").read_text() == "previous"
    (stage,) = tmp_path.glob(".cut.staging-*")
    assert (stage / "last.ckpt").is_file()

    monkeypatch.undo()
    monkeypatch.delenv(STAGE_ENV, raising=False)
    resumed = probe.run(_args(images, cut, cache, "--resume"))
    assert "resumed the linear grid after epoch 2/4 from last.ckpt" in capsys.readouterr().out
    for name in ("knn", "linear"):
        for k, v in whole[name].items():
            if k == "run":  # named after the output folder
                continue
            if isinstance(v, float):
                assert resumed[name][k] == pytest.approx(v, abs=1e-6), (name, k)
            else:
                assert resumed[name][k] == v, (name, k)
    a, b = (load_file(str(d / "linear" / "adapter" / "adapter.safetensors")) for d in (tmp_path / "whole", cut))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((cut / "linear" / "metrics.json").read_text())["config"] == whole["linear"]["config"]
    assert "resume" not in whole["linear"]["config"]
    assert not list(tmp_path.glob(".cut.*")) and not (cut / "last.ckpt").exists()


def test_resume_with_nothing_to_resume_is_one_line_and_exit_2(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert friendly(probe.main, _args(images, out, tmp_path / "cache", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: nothing to resume") and "without --resume" in err[0]
    assert list(tmp_path.iterdir()) == []
