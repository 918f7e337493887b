"""`python -m medical.probe`: the frozen-backbone regimes of the DINOv2 radiology study.

Extracts features once (cached on disk), then evaluates the kNN classifier for every k and
trains the grid of linear heads (last 1 / 4 blocks' CLS, with or without average-pooled patch
tokens, x learning rates) in one pass, choosing the best head on validation.

    python -m medical.probe --config domains/medical/probe.yaml --data.root /data/pneumoniamnist.npz
    python -m medical.probe            # offline demo: synthetic images, small random DINOv2-architecture ViT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser

from medical.probes import KS, LRS, cached_features, describe, knn_grid, train_linear_grid
from shared import backbones
from shared.cli import arg_value, friendly, is_demo, write_json_atomic
from shared.data import FeatureCache

RECIPES = Path(__file__).resolve().parent.parent / "domains" / "medical"
DEMO = RECIPES / "probe_demo.yaml"


def parser() -> ArgumentParser:
    p = ArgumentParser(description="kNN and linear-probe grid on frozen backbone features")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--seed_everything", type=int, default=0)
    p.add_argument("--output_dir", default="runs/medical/probe")
    p.add_argument("--backbone", default="dinov2")
    p.add_argument("--backbone_kwargs", type=dict[str, Any], default={})
    p.add_argument("--blocks", type=int, default=4, help="last n blocks for the multi-block CLS feature")
    p.add_argument("--ks", type=list[int], default=list(KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--lrs", type=list[float], default=list(LRS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--cache_dir", default="~/.cache/peft-suite/features")
    p.add_subclass_arguments(L.LightningDataModule, "data")
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    defaults = [str(DEMO)] if is_demo(argv) else []
    p = parser()
    p.default_config_files = defaults
    cfg = p.parse_args(argv)
    L.seed_everything(cfg.seed_everything)
    init = p.instantiate_classes(cfg)
    data = init.data
    data.setup("fit")
    model = backbones.create(cfg.backbone, **cfg.backbone_kwargs).eval()
    loaders = {"train": data.train_dataloader(), "val": data.val_dataloader(), "test": data.test_dataloader()}
    cache = FeatureCache(Path(cfg.cache_dir).expanduser())
    # the whole data config (class, root, flag, seed, few_shot, split fractions, label policy)
    dataset_id = json.dumps(cfg.data.as_dict(), sort_keys=True, default=str)
    feats = cached_features(model, loaders, cache, getattr(data, "preprocessing", {}), dataset_id, cfg.blocks)
    multilabel = bool(getattr(data, "multilabel", False))
    rows = {}
    if not multilabel:
        knn = knn_grid(feats["train"], feats["test"], "cls_1", cfg.ks, cfg.temperature)
        knn_val = knn_grid(feats["train"], feats["val"], "cls_1", cfg.ks, cfg.temperature)
        best_k = max(knn_val, key=knn_val.get)
        rows["knn"] = {"method": "knn", "k": best_k, "val": knn_val[best_k], "test/acc": knn[best_k],
                       "all_k": {str(k): v for k, v in knn.items()}, "trainable_params": 0}
        print("kNN (cosine, T=%.2f) test accuracy by k: %s; chosen on val: k=%d -> %.4f"
              % (cfg.temperature, {k: round(v, 4) for k, v in knn.items()}, best_k, knn[best_k]))
    best, results, grid = train_linear_grid(feats, data.num_classes, multilabel, cfg.epochs, cfg.batch_size,
                                            cfg.lrs, cfg.blocks, cfg.seed_everything)
    metric = "test/auroc" if multilabel else "test/acc"
    head = grid.heads[grid.names.index((best.feature, best.lr))]
    rows["linear"] = {"method": "linear_probe_grid", "feature": best.feature, "lr": best.lr, "val": best.val,
                      metric: best.test, "trainable_params": sum(p.numel() for p in head.parameters())}
    print(describe(results))
    print(f"best linear probe on val: {best.feature} lr {best.lr:g} -> {metric} {best.test:.4f}")
    out = Path(cfg.output_dir)
    total = sum(p.numel() for p in model.parameters())
    for name, row in rows.items():
        row.update(run=f"{out.name}_{name}", backbone=cfg.backbone, dataset=getattr(data, "name", type(data).__name__),
                   fold=None, few_shot=getattr(data, "few_shot", None), total_params=total)
        write_json_atomic(out / name / "metrics.json", row)
    print(f"results written to {out}")
    return rows


if __name__ == "__main__":
    if is_demo(sys.argv[1:]) and not {"-h", "--help"} & set(sys.argv[1:]):
        from medical.synthetic import write_image_folder

        root = arg_value(sys.argv[1:], "--data.root", "--data.init_args.root") or "runs/medical_demo/images"
        print(f"demo: synthetic images in {root}; backbone: a small DINOv2-architecture ViT with RANDOM weights")
        write_image_folder(root)
    sys.exit(friendly(run))
