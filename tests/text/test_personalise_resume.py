"""`python -m text.personalise --resume`: a run stopped by SIGTERM after some of its units (baselines
scored, the shared adapter, each reader's adapter) continues from the last.ckpt its staging folder kept,
into the same output folder, and ends with the scores and adapters of an uninterrupted run; `--resume`
with nothing to resume is one line and exit status 2 (docs/operations.md)."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from shared.cli import STAGE_ENV, friendly
from shared.resume import LoopCheckpoint
from text import personalise as P

ARGS = ["--demo-abstracts", "5", "--readers", "r1,r2", "--test-abstracts", "2", "--shared-steps", "3",
        "--reader-steps", "2", "--r", "4", "--alpha", "8", "--batch-size", "6", "--baselines", "vanilla,metadata"]


@pytest.fixture(autouse=True)
def _no_inherited_stage(monkeypatch):
    monkeypatch.delenv(STAGE_ENV, raising=False)


def _stop_after(monkeypatch, n: int, seen: list):
    save = LoopCheckpoint.save

    def stop(self, state):
        save(self, state)
        seen.append((sorted(state["baselines"]), sorted(state["adapters"])))
        if len(seen) == n:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(LoopCheckpoint, "save", stop)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("personalise") / "whole"
    return out, P.main(ARGS + ["--output-dir", str(out)])


@pytest.mark.parametrize("units", [3, 4])  # stopped after the shared adapter / after the first reader's
def test_stopped_run_resumes_to_the_uninterrupted_results(units, uninterrupted, tmp_path, monkeypatch, capsys):
    whole_dir, whole = uninterrupted
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "metrics.json").write_text("previous")
    seen: list = []
    _stop_after(monkeypatch, units, seen)
    capsys.readouterr()
    assert friendly(P.main, ARGS + ["--output-dir", str(cut)]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stopped by SIGTERM: {cut} was left as it was")
    assert err[0].endswith("--output-dir " + str(cut) + " --resume") and "python -m text.personalise" in err[0]
    done = [(["vanilla"], []), (["metadata", "vanilla"], []), (["metadata", "vanilla"], ["__shared__"]),
            (["metadata", "vanilla"], ["__shared__", "r1"])]
    assert seen == done[:units]
    assert (cut / "metrics.json").read_text() == "previous"

    monkeypatch.undo()
    monkeypatch.delenv(STAGE_ENV, raising=False)
    resumed = P.main(ARGS + ["--output-dir", str(cut), "--resume"])
    printed = capsys.readouterr().out
    assert f"resumed from last.ckpt: 2 baseline(s) scored, {units - 2} adapter(s) trained" in printed
    assert resumed["results"].keys() == whole["results"].keys()
    timing = ("wall_s",)
    for method, m in whole["results"].items():
        for k, v in m.items():
            if k not in timing:
                assert resumed["results"][method][k] == pytest.approx(v, abs=1e-6), (method, k)
    assert resumed["training"]["shared_losses"] == pytest.approx(whole["training"]["shared_losses"], abs=1e-6)
    for r, losses in whole["training"]["reader_losses"].items():
        assert resumed["training"]["reader_losses"][r] == pytest.approx(losses, abs=1e-6), r
    assert resumed["command"] == whole["command"].replace(str(whole_dir), str(cut))
    a = json.loads((whole_dir / "scores.json").read_text())["scores"]
    b = json.loads((cut / "scores.json").read_text())["scores"]
    assert b.keys() == a.keys() and all(b[k] == pytest.approx(a[k], abs=1e-6) for k in a)
    for bundle in ("shared", "readers/r1", "readers/r2"):
        x, y = (load_file(str(d / "adapters" / bundle / "adapter.safetensors")) for d in (whole_dir, cut))
        assert x.keys() == y.keys() and x
        for name in x:
            torch.testing.assert_close(y[name], x[name], rtol=1e-5, atol=1e-6, msg=f"{bundle} {name}")
    assert not list(tmp_path.glob(".cut.*")) and not (cut / "last.ckpt").exists()


def test_resume_with_nothing_to_resume_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert friendly(P.main, ARGS + ["--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: nothing to resume") and "without --resume" in err[0]
    assert list(tmp_path.iterdir()) == []
