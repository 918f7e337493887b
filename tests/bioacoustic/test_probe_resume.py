"""`python -m audio.probe --resume`: a run stopped by SIGTERM continues from the last.ckpt its staging folder
kept (after its last finished epoch) into the same output folder, and ends with the metrics of an
uninterrupted run; `--resume` with nothing to resume is one line and exit status 2 (docs/operations.md)."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from shared.cli import STAGE_ENV, friendly


@pytest.fixture(autouse=True)
def _no_inherited_stage(monkeypatch):
    monkeypatch.delenv(STAGE_ENV, raising=False)


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    from audio.birds.synthetic import write_synthetic_birds
    from shared.cli import mark_demo_folder

    root = tmp_path_factory.mktemp("birds") / "birds"
    mark_demo_folder(root, "test")
    write_synthetic_birds(root, num_species=3, focal_per_species=3, soundscapes=2, seed=0)
    return root


def _args(root, out, cache, *extra):
    from audio.birds import probe

    return ["--config", str(probe.DEMO), "--output_dir", str(out), "--cache_dir", str(cache), "--data.root", str(root),
            "--data.num_species", "3", "--data.focal_per_species", "3", "--data.soundscapes", "2",
            "--backbone_kwargs", '{"embed_dim": 16, "depth": 1, "num_heads": 2}', "--epochs", "4",
            "--batch_size", "4", "--prototypes_per_class", "4", "--time_recompute", "false", *extra]


def test_stopped_probe_run_resumes_to_the_uninterrupted_metrics(birds, tmp_path, monkeypatch, capsys):
    from audio.birds import probe

    cache = tmp_path / "cache"
    whole = probe.main(_args(birds, tmp_path / "whole", cache))

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "results.md").write_text("previous")
    epoch = probe.train_epoch
    calls = []

    def stop_in_epoch_3(*a, **k):  # SIGTERM arrives while epoch 3 ends, before its checkpoint: epoch 3 is redone
        loss = epoch(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(probe, "train_epoch", stop_in_epoch_3)
    capsys.readouterr()
    assert friendly(probe.main, _args(birds, cut, cache)) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stopped by SIGTERM: {cut} was left as it was")
    assert err[0].endswith(" --resume") and "continue it with: python -m" in err[0]
    assert (cut / "results.md").read_text() == "previous"  # nothing published
    (stage,) = tmp_path.glob(".cut.staging-*")
    assert (stage / "last.ckpt").is_file()

    monkeypatch.undo()
    monkeypatch.delenv(STAGE_ENV, raising=False)
    resumed = probe.main(_args(birds, cut, cache, "--resume"))
    printed = capsys.readouterr().out
    assert "resumed after epoch 2/4 from last.ckpt" in printed and "epoch 4/4" in printed
    assert set(resumed) == set(whole) == {"linear", "attentive", "prototypical"}
    for kind in whole:
        for k in ("test/cmap", "test/auroc", "test/top1"):
            assert resumed[kind][k] == pytest.approx(whole[kind][k], abs=1e-6), (kind, k)
        assert resumed[kind]["config"] == whole[kind]["config"] and "resume" not in resumed[kind]["config"]
        saved = json.loads((cut / kind / "metrics.json").read_text())
        assert saved["test/cmap"] == pytest.approx(whole[kind]["test/cmap"], abs=1e-6)
        # the trained heads themselves (the metrics of a tiny test split move little): same to float tolerance
        a, b = (load_file(str(d / kind / "adapter" / "adapter.safetensors")) for d in (tmp_path / "whole", cut))
        assert a.keys() == b.keys() and a
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=f"{kind} {name}")
    assert not list(tmp_path.glob(".cut.*"))  # published: no staging folder, no lock, no last.ckpt left
    assert not (cut / "last.ckpt").exists()


def test_resume_refuses_another_recipe_and_nothing_to_resume(birds, tmp_path, monkeypatch, capsys):
    from audio.birds import probe
    from shared.resume import LoopCheckpoint

    out, cache = tmp_path / "run", tmp_path / "cache"
    assert friendly(probe.main, _args(birds, out, cache, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: nothing to resume") and "without --resume" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written (not even the cache)

    save = LoopCheckpoint.save

    def stop_after_first(self, state):
        save(self, state)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(LoopCheckpoint, "save", stop_after_first)
    assert friendly(probe.main, _args(birds, out, cache)) == 143
    monkeypatch.undo()
    monkeypatch.delenv(STAGE_ENV, raising=False)
    capsys.readouterr()
    # another recipe (epochs) would end as neither run: refused in one line; the stopped run stays resumable
    assert friendly(probe.main, _args(birds, out, cache, "--resume", "--epochs", "5")) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "--resume needs the stopped run's recipe" in err and "epochs (4 in the stopped run, 5 now)" in err
    assert len(list(tmp_path.glob(".run.staging-*/last.ckpt"))) == 1 and not out.exists()
