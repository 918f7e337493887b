"""The generic Lightning module, the CLI runner and a 2-process DDP run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared import peft
from shared.cli import run
from shared.data import SyntheticDataModule
from shared.module import ClassificationModule, cosine_with_warmup

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "domains" / "demo.yaml"


def test_cosine_with_warmup_values():
    assert cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 10) == pytest.approx(0.5)  # halfway through the decay
    assert cosine_with_warmup(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(25, 100, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def _module(**kw):
    args = dict(backbone="tiny-vit", methods=[{"name": "lora", "r": 4, "targets": ["qkv"]}],
                num_classes=3, lr=1e-3)
    args.update(kw)
    return ClassificationModule(**args)


class _FakeTrainer:
    estimated_stepping_batches = 10


def test_param_groups_and_schedule():
    m = _module(head={"kind": "prototypical", "prototypes_per_class": 2, "upsample": 1},
                lr_groups={r"head\.prototypes": 0.04})
    m._trainer = _FakeTrainer()
    m.trainer  # noqa: B018 - property works with the fake
    opt = m.configure_optimizers()["optimizer"]
    by_lr = {g["lr"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    protos = m.model.head.prototypes.numel()
    assert by_lr[0.04] == protos
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert by_lr[1e-3] == trainable - protos
    assert opt.defaults["betas"] == (0.9, 0.999)


def test_multilabel_training_reduces_loss():
    torch.manual_seed(0)
    m = _module(multilabel=True, loss="asl", head={"kind": "prototypical", "prototypes_per_class": 2},
                orthogonality_weight=0.1, methods=[{"name": "adapter", "bottleneck": 8}])
    x = torch.randn(8, 3, 32, 32)
    y = (torch.rand(8, 3) > 0.5).long()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = m.loss(m(x), y) + 0.1 * m.model.head.orthogonality_loss()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss must be"):
        _module(loss="hinge")
    with pytest.raises(ValueError, match="2 labels for num_classes=3"):
        _module(labels=["a", "b"])
    with pytest.raises(KeyError, match="unknown backbone"):
        _module(backbone="nope")


def test_checkpoint_keeps_only_trained_tensors():
    m = _module()
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    kept = set(ckpt["state_dict"])
    trainable = {f"model.{n}" for n, p in m.model.named_parameters() if p.requires_grad}
    assert trainable <= kept
    assert not any("base_layer" in k for k in kept)  # frozen weights are not stored


def _cli_args(out, *extra):
    return ["--output_dir", str(out), "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false", *extra]


def test_cli_run_trains_tests_best_and_saves(tmp_path):
    out = tmp_path / "run"
    row = run(default_config=DEMO, args=_cli_args(out))
    assert row["test/acc"] > 0.5  # 5 classes: chance is 0.2
    assert row["best_checkpoint"] == "best.ckpt"
    assert json.loads((out / "metrics.json").read_text())["trainable_params"] == row["trainable_params"]
    # The bundle reproduces the trained model's predictions.
    data = SyntheticDataModule(kind="spectrogram", num_classes=5, per_class=40, shape=(64, 32))
    data.setup()
    x, _ = data.splits["test"][:8]
    from shared.backbones import create

    kwargs = dict(max_length=64, num_mel_bins=32, hidden_size=64, layers=2, heads=4)
    with pytest.raises(peft.BundleError, match="fingerprint"):
        peft.load(create("tiny-ast", seed=1, **kwargs), out / "adapter")  # other weights than trained on
    loaded = peft.from_bundle(out / "adapter").eval()  # rebuilt from the bundle's id + kwargs (seeded)
    model = peft.load(create("tiny-ast", **kwargs), out / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert loaded(x).argmax(-1).eq(data.splits["test"][:8][1]).float().mean() > 0.5
    meta = peft.read_meta(out / "adapter")
    assert meta["labels"] == [f"class_{i}" for i in range(5)]
    assert meta["metrics"]["test/acc"] == pytest.approx(row["test/acc"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_failed_run_keeps_previous_results(tmp_path):
    out = tmp_path / "run"
    run(default_config=DEMO, args=_cli_args(out))
    before = (out / "metrics.json").read_text()
    with pytest.raises(Exception):
        # A method the tiny AST cannot take fails after the CLI has started the run.
        run(default_config=DEMO, args=_cli_args(out, "--model.methods", '[{"name": "bitfit"}, {"name": "nope"}]'))
    assert (out / "metrics.json").read_text() == before
    assert (out / "adapter" / "adapter.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ddp_two_processes_train_and_save_one_bundle(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PEFT_SUITE_STAGE_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "shared.demo", *_cli_args(out, "--trainer.accelerator", "cpu",
                                                         "--trainer.devices", "2", "--trainer.strategy", "ddp")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter" / "adapter.safetensors").is_file()
    row = json.loads((out / "metrics.json").read_text())
    assert row["test/acc"] > 0.5
    # exactly one bundle and no leftover staging folders from either rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]


def test_init_bundle_continues_from_a_saved_adapter_and_checks_labels(tmp_path):
    m = _module(labels=["a", "b", "c"])
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # a "trained" adapter
    m.save_bundle(tmp_path / "b")
    again = _module(labels=["a", "b", "c"], init_bundle=str(tmp_path / "b"), methods=[])
    x = torch.randn(2, 3, 32, 32)
    m.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(m(x), again(x))
    assert peft.summary(again.model)["by_method"].keys() == {"lora", "head"}
    assert all(p.requires_grad for p in again.model.head.parameters())
    with pytest.raises(ValueError, match=r"3 labels disagree with the data's 3 labels \(e\.g\. c, z\)"):
        _module(labels=["a", "b", "z"], init_bundle=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="same names, different order"):
        _module(labels=["b", "a", "c"], init_bundle=str(tmp_path / "b"))


def test_friendly_entry_prints_one_line_errors(capsys, monkeypatch):
    from shared.cli import friendly

    monkeypatch.delenv("PEFT_SUITE_TRACEBACK", raising=False)

    def bad():
        raise ValueError("data/meta.csv: missing column(s) ['fold']")

    assert friendly(bad) == 2
    assert capsys.readouterr().err == "error: data/meta.csv: missing column(s) ['fold']\n"
    assert friendly(lambda: None) == 0


def test_root_cause_surfaces_our_error_from_jsonargparse_union_messages():
    from shared.cli import root_cause

    msg = ("Does not validate against any of the Union subtypes\nSubtypes: [...]\nErrors:\n"
           "  - /nonexistent: dataset folder not found\n  - Expected a <class 'NoneType'>\nGiven value: ...")
    assert root_cause(msg) == "/nonexistent: dataset folder not found"
    assert root_cause("plain message") == "plain message"
