"""medical.fewshot (shots x seeds sweep on cached features), medical.study (scores of a trained bundle,
the method table with bootstrap intervals) and `medical.report --study`, on tiny data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medical import fewshot, report, study, train
from shared.bootstrap import accuracy, auroc, bootstrap_interval

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "domains" / "medical"
TINY = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 4, num_heads: 4, reg_tokens: 4}"
FAST = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]


@pytest.fixture(autouse=True)
def _no_stage_env(monkeypatch):
    monkeypatch.delenv("PEFT_SUITE_STAGE_DIR", raising=False)


def _feats(n: dict[str, int], seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, count in n.items():
        y = torch.arange(count) % 2
        sig = (y.float()[:, None] - 0.5) * 3.0
        f = lambda d: sig.expand(-1, d) + torch.randn(count, d, generator=g)  # noqa: E731
        out[split] = {"cls_1": f(8), "cls_4": f(16), "patch_mean": f(8), "labels": y}
    return out


def test_parse_shots():
    assert fewshot.parse_shots("1, 2,4,all") == [1, 2, 4, None]
    for bad in ("0", "two", ""):
        with pytest.raises(ValueError, match="--shots"):
            fewshot.parse_shots(bad)


def test_sweep_rows_subsets_and_kept_scores():
    feats = _feats({"train": 60, "val": 20, "test": 30})
    rows, kept = fewshot.sweep(feats, [1, 4, None], [0, 1, 2], num_classes=2, ks=[1, 3, 50], epochs=2, batch_size=16,
                               keep_at=4, log=lambda s: None)
    assert len(rows) == 3 * 3 * 2  # shots x seeds x {kNN, linear}
    by = {(r["shots"], r["seed"], r["regime"]): r for r in rows}
    assert by[(1, 0, "knn")]["n_train"] == 2 and by[(4, 2, "linear")]["n_train"] == 8 and by[(None, 0, "knn")]["n_train"] == 60
    # the same number of SGD steps at every budget: 2 epochs x 4 batches of the full split
    assert by[(1, 0, "linear")]["epochs"] == 8 and by[(None, 0, "linear")]["epochs"] == 2
    # separable classes: every probe beats chance clearly from 4 shots on
    assert all(r["test/acc"] > 0.85 and r["test/auroc"] > 0.9 for r in rows if r["shots"] != 1)
    assert set(kept) == {(m, s) for m in ("knn", "linear") for s in (0, 1, 2)}
    k0 = kept[("linear", 0)]
    assert k0["test"].shape == (30, 2) and by[(4, 0, "linear")]["test/acc"] == pytest.approx(
        accuracy(feats["test"]["labels"].numpy(), k0["test"].numpy()))


def test_probe_subsets_are_the_trained_regimes_subsets(med, tmp_path):
    """The table compares probes and trained regimes on the SAME k-shot images: the sweep's draw for
    seed s is medical.train's `--data.init_args.few_shot k --data.init_args.seed s`."""
    from medical.data import MedMNISTDataModule
    from shared.data import few_shot_indices

    npz = _tiny_npz(med, tmp_path)
    full = MedMNISTDataModule(npz).splits["train"]
    for seed in (0, 3):
        sub = MedMNISTDataModule(npz, few_shot=4, seed=seed).splits["train"]
        idx = few_shot_indices(full.targets, 4, seed=seed)
        assert [full.items[i] for i in idx] == list(sub.items)


def _tiny_npz(med, tmp_path: Path) -> Path:
    return med.write_medmnist(tmp_path / "pneumoniamnist.npz", n=(40, 16, 24), shape=(32, 32))


def test_fewshot_cli_then_study_report(med, tmp_path):
    npz = _tiny_npz(med, tmp_path)
    out = tmp_path / "table" / "fewshot" / "tiny"
    doc = fewshot.main(["--config", str(RECIPES / "probe_demo.yaml"), "--data", "medical.data.medmnist.MedMNISTDataModule",
                        "--data.root", str(npz), "--data.img_size", "32", "--backbone_kwargs", TINY, "--ks", "[3, 5]",
                        "--epochs", "2", "--shots", "1,4,all", "--seeds", "2", "--table_shots", "4",
                        "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out), "--label", "tiny random ViT"])
    assert doc["shots"] == [1, 4, "all"] and doc["n_train_all"] == 40 and len(doc["rows"]) == 3 * 2 * 2
    assert json.loads((out / "fewshot.json").read_text())["backbone_label"] == "tiny random ViT"
    run = out / "shots4" / "linear" / "seed1"
    m = json.loads((run / "metrics.json").read_text())
    with np.load(run / "scores.npz") as z:
        assert z["test_probs"].shape == (24, 2) and z["val_probs"].shape == (16, 2)
        assert m["test/acc"] == pytest.approx(accuracy(z["test_labels"], z["test_probs"]))
    assert m["few_shot"] == 4 and m["trainable_params"] > 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3  # extracted once

    # two fake trained runs of one regime (two lrs): the one with the better validation AUROC is the row
    y_val, y_test = np.arange(16) % 2, np.arange(24) % 2
    for lr, good in ((1e-3, True), (1e-4, False)):
        r = tmp_path / "table" / "train" / "lora" / f"lr{lr:g}" / "seed0"
        r.mkdir(parents=True)
        rng = np.random.default_rng(int(good))
        sv = (y_val * (2.0 if good else 0.2) + rng.normal(size=16))
        st = (y_test * 2.0 + rng.normal(size=24))
        np.savez(r / "scores.npz", val_probs=np.stack([-sv, sv], 1), val_labels=y_val,
                 test_probs=np.stack([-st, st], 1), test_labels=y_test)
        (r / "metrics.json").write_text(json.dumps({
            "method": "lora", "few_shot": 4, "trainable_params": 1234, "backbone": "dinov2",
            "config": {"seed_everything": 0, "model": {"lr": lr, "methods": [{"name": "lora"}],
                                                       "backbone_kwargs": {"img_size": 32}}}}))
        (r / "cpu.json").write_text(json.dumps({"train": {"user_seconds": 10.0, "sys_seconds": 1.0, "wall_seconds": 12.0,
                                                          "load_before": [1.0, 1.0, 1.0]}}))
    md, png = report.main([str(tmp_path / "table"), "--study", "--resamples", "200", "--plot", str(tmp_path / "f.png")])
    text = md.read_text()
    head = text.splitlines()[2]
    for col in ("test acc [95% CI]", "test AUROC [95% CI]", "trainable params", "step time vs full",
                "peak memory vs full", "CPU s per run", "Δ AUROC vs linear probe"):
        assert col in head
    lora = next(line for line in text.splitlines() if line.startswith("| LoRA"))
    assert "| 0.001 |" in lora and "| 1,234 |" in lora and "| 11 |" in lora  # chosen lr, params, CPU s
    with np.load(tmp_path / "table" / "train" / "lora" / "lr0.001" / "seed0" / "scores.npz") as z:
        st = z["test_probs"]
    lo, hi = bootstrap_interval(auroc, y_test, [st], n_resamples=200, seed=0)
    assert f"{auroc(y_test, st):.3f} [{lo:.3f}, {hi:.3f}]" in lora
    assert "Google AutoML Vision" in text and "balanced subset" in text and "Learning-rate grid" in text
    assert png.stat().st_size < 100_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_score_run_reproduces_the_trained_test_accuracy(med, tmp_path):
    npz = _tiny_npz(med, tmp_path)
    run = tmp_path / "lora"
    row = train.main(["--config", str(RECIPES / "data" / "medmnist.yaml"), "--config", str(RECIPES / "methods" / "bitfit.yaml"),
                      "--data.root", str(npz), "--data.init_args.img_size", "32", "--data.init_args.num_workers", "0",
                      "--data.init_args.batch_size", "16", "--model.backbone", "tiny-vit", "--model.backbone_kwargs", TINY,
                      "--trainer.max_epochs", "1", "--output_dir", str(run), *FAST])
    got = study.score_run(run)
    assert got["test/acc"] == pytest.approx(row["test/acc"], abs=1e-6)
    with np.load(run / "scores.npz") as z:
        assert z["test_probs"].shape == (24, 2) and np.allclose(z["test_probs"].sum(1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="no adapter bundle"):
        study.score_run(tmp_path)
