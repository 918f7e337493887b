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
    x, y = data.splits["test"][:]  # the whole test split (it is ordered by class)
    from shared.backbones import create

    kwargs = dict(max_length=64, num_mel_bins=32, hidden_size=64, layers=2, heads=4)
    with pytest.raises(peft.BundleError, match="fingerprint"):
        peft.load(create("tiny-ast", seed=1, **kwargs), out / "adapter")  # other weights than trained on
    loaded = peft.from_bundle(out / "adapter").eval()  # rebuilt from the bundle's id + kwargs (seeded)
    model = peft.load(create("tiny-ast", **kwargs), out / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert loaded(x).argmax(-1).eq(y).float().mean().item() == pytest.approx(row["test/acc"])
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


@pytest.mark.slow  # two fresh interpreters (~60 s); the de-duplication logic is in the default tier (test_distributed.py)
def test_ddp_two_processes_train_and_save_one_bundle(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PEFT_SUITE_STAGE_DIR", None)
    # 41 per class: 9 test clips per class, 45 in all, which 2 processes cannot share evenly.
    proc = subprocess.run(
        [sys.executable, "-m", "shared.demo", *_cli_args(out, "--trainer.accelerator", "cpu",
                                                         "--trainer.devices", "2", "--trainer.strategy", "ddp",
                                                         "--data.per_class", "41", "--trainer.max_epochs", "1")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter" / "adapter.safetensors").is_file()
    row = json.loads((out / "metrics.json").read_text())
    assert row["test/acc"] > 0.3  # 5 classes: chance is 0.2
    # Every test sample counted exactly once (a padding DistributedSampler scores 46 samples, one
    # twice): the DDP metric equals the bundle's accuracy over the 45 test samples in one process.
    data = SyntheticDataModule(kind="spectrogram", num_classes=5, per_class=41, shape=(64, 32))
    data.setup()
    x, y = data.splits["test"].tensors
    assert len(y) == 45
    with torch.no_grad():
        correct = int((peft.from_bundle(out / "adapter").eval()(x).argmax(-1) == y).sum())
    assert 0 < correct < 45  # a perfect or null score would not tell 45 from 46 samples
    assert row["test/acc"] == pytest.approx(correct / 45, abs=1e-6)
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


# --------------------------------------------------------------------------- issue 13: metrics and selection


def test_checkpoint_mode_follows_the_monitored_metric():
    from shared.module import PeftModule, monitor_mode

    class Default(PeftModule):
        pass

    assert monitor_mode("val/loss") == "min" and monitor_mode("val/hd95") == "min"
    assert monitor_mode("val/acc") == "max" and monitor_mode("val/dice") == "max" and monitor_mode("val/auroc") == "max"
    [cb] = Default().configure_callbacks()
    assert (cb.monitor, cb.mode) == ("val/loss", "min")  # was "max": the worst checkpoint kept
    [cb] = _module().configure_callbacks()
    assert (cb.monitor, cb.mode) == ("val/acc", "max")
    [cb] = _module(multilabel=True, monitor="val/auroc").configure_callbacks()
    assert (cb.monitor, cb.mode) == ("val/auroc", "max")
    assert _module(multilabel=True).monitor == "val/map"
    with pytest.raises(ValueError, match="monitor 'val/dice' is not logged"):
        _module(monitor="val/dice")


def test_weight_decay_exclusion_option():
    m = _module(head={"kind": "prototypical", "prototypes_per_class": 2, "upsample": 1}, weight_decay=0.1,
                methods=[{"name": "prompt", "n_tokens": 2, "deep": True}, {"name": "bitfit"},
                         {"name": "lora", "r": 4, "targets": ["qkv"]}], decay_exclude=True)
    m._trainer = _FakeTrainer()
    opt = m.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in m.model.named_parameters()}
    by_wd = {wd: sorted(names[id(p)] for g in opt.param_groups if g["weight_decay"] == wd for p in g["params"])
             for wd in {g["weight_decay"] for g in opt.param_groups}}
    assert set(by_wd) == {0.0, 0.1}
    assert all("lora_" in n for n in by_wd[0.1] if n != "head.weight")  # LoRA matrices and the class weights decay
    assert "head.prototypes" in by_wd[0.0] and "backbone.peft_prompt.tokens" in by_wd[0.0]
    assert any(n.endswith(".bias") for n in by_wd[0.0])
    m = _module(weight_decay=0.1)  # default: everything decays (PETL-AST's AdamW)
    m._trainer = _FakeTrainer()
    assert {g["weight_decay"] for g in m.configure_optimizers()["optimizer"].param_groups} == {0.1}


def test_macro_scores_drop_classes_absent_from_the_split():
    from sklearn.metrics import average_precision_score, roc_auc_score
    from torchmetrics.functional.classification import multilabel_average_precision

    from shared.module import PerClassScore, macro_over_defined

    # 3 labels, the third never positive in this split (a rare finding in a small split)
    target = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    preds = torch.tensor([[.9, .2, .1], [.4, .8, .3], [.3, .7, .2], [.6, .1, .9], [.8, .3, .1], [.2, .4, .5]])
    mean, per_class, dropped = macro_over_defined(preds, target, "ap")
    want = [average_precision_score(target[:, j], preds[:, j]) for j in range(2)]
    assert dropped == 1 and torch.isnan(per_class[2])
    assert mean == pytest.approx(sum(want) / 2)
    tm = multilabel_average_precision(preds, target, num_labels=3, average="macro").item()
    assert tm < mean - 0.2  # torchmetrics' macro scores the absent label as 0
    # unknown targets (-1) are left out per class
    t2 = target.clone()
    t2[0, 0] = -1
    auroc, _, _ = macro_over_defined(preds, t2, "auroc")
    assert auroc == pytest.approx((roc_auc_score(target[1:, 0], preds[1:, 0]) + roc_auc_score(target[:, 1], preds[:, 1])) / 2)
    m = PerClassScore("ap")
    m.update(preds[:3], target[:3])
    m.update(preds[3:], target[3:])  # over the split, not per batch
    assert torch.allclose(m.compute()[:2], torch.tensor(want, dtype=torch.float32), atol=1e-6)


def _logged_metrics(m, batches):
    logged = {}
    m.log = lambda *a, **k: None
    m.log_dict = lambda d, **k: logged.update({k_: float(v) for k_, v in d.items()})
    for logits, y in batches:
        m.forward = lambda x, _l=logits: _l
        m._shared_step((torch.zeros(len(y), 3, 32, 32), y), "val")
    m._log_metrics("val")
    return logged


def test_binary_tasks_get_auroc_and_multilabel_logs_dropped_labels():
    from sklearn.metrics import roc_auc_score

    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.5], [2.0, 1.0], [0.0, -1.0]])
    y = torch.tensor([1, 0, 0, 1, 0])
    got = _logged_metrics(_module(num_classes=2), [(logits[:3], y[:3]), (logits[3:], y[3:])])
    want = roc_auc_score(y, logits.softmax(-1)[:, 1])
    assert got["val/auroc"] == pytest.approx(want) and got["val/acc"] == pytest.approx(0.6)
    assert got["val/auroc_classes_dropped"] == 0
    yml = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, float("nan")], [1.0, 1.0, 0.0]])
    got = _logged_metrics(_module(multilabel=True), [(torch.randn(3, 3), yml)])
    assert got["val/map_classes_dropped"] == got["val/auroc_classes_dropped"] == 2  # label 0 all positive, 2 none


def test_pos_weight_and_unknown_targets_in_the_multilabel_loss():
    import torch.nn.functional as F

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]])
    y = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, float("nan")]])
    m = _module(multilabel=True, pos_weight=[3.0, 1.0, 0.5])
    keep = ~torch.isnan(y)
    full = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none",
                                              pos_weight=torch.tensor([3.0, 1.0, 0.5]))
    assert m.loss(logits, y).item() == pytest.approx(full[keep].mean().item())
    with pytest.raises(ValueError, match="pos_weight is for multi-label"):
        _module(pos_weight=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="3 values|has 2 values"):
        _module(multilabel=True, pos_weight=[1.0, 2.0])
