"""`python -m medical.fewshot`: few-shot curves of the frozen-backbone regimes, as the DINOv2 radiology study plots them.

Features are extracted ONCE (the same cache `medical.probe` fills and reads), then for every
(images per class, seed) a k-shot subset of the cached training features is drawn
(`shared.data.few_shot_indices`, seed = the seed) and the kNN (k chosen on validation) and the
linear-probe grid (head chosen on validation) are fitted on it and scored on the full test split.
The linear grid takes the same number of SGD steps at every shot count as the full-data recipe
(`epochs` x batches of the whole training split), so a 1-shot probe is not an untrained one.

    python -m medical.fewshot --config domains/medical/probe.yaml --data.root <npz> \\
        --shots 1,2,4,8,16,32,64,all --seeds 5 --table_shots 64 --output_dir runs/medical_table/fewshot/dinov2

Writes OUTPUT_DIR/fewshot.json (one row per shots x seed x regime: test accuracy and AUROC, the
chosen k / head) and, for `--table_shots`, one run folder per regime and seed
(OUTPUT_DIR/shots<k>/{knn,linear}/seed<s>/{metrics.json,scores.npz}) that `medical.report --study`
puts in the method table (test and validation class probabilities for bootstrap intervals).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medical.probes import KS, auroc, knn_grid, train_linear_grid, variants
from shared.cli import friendly
from shared.data import few_shot_indices
from shared.heads import KNNClassifier


def parse_shots(text: str | list) -> list[int | None]:
    """"1,2,4,all" -> [1, 2, 4, None] (None = every training image)."""
    items = text if isinstance(text, list) else str(text).split(",")
    out: list[int | None] = []
    for item in items:
        s = str(item).strip().lower()
        if s == "all":
            out.append(None)
            continue
        try:
            k = int(s)
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"--shots: {item!r} is not a positive integer or 'all' (e.g. --shots 1,2,4,8,all)")
        out.append(k)
    if not out:
        raise ValueError("--shots: give at least one value (e.g. --shots 1,2,4,8,all)")
    return out


def subset(split: dict[str, torch.Tensor], idx: np.ndarray) -> dict[str, torch.Tensor]:
    t = torch.as_tensor(idx, dtype=torch.long)
    return {k: v[t] for k, v in split.items()}


def knn_fit(train: dict, val: dict, test: dict, ks=KS, temperature: float = 0.07, num_classes: int = 2):
    """kNN on cls_1 (cosine, temperature-weighted), k chosen on validation accuracy (the first best
    k; ks beyond the training size are clipped, so they tie with it). Returns (k, val probs, test probs)."""
    val_acc = knn_grid(train, val, "cls_1", ks, temperature)
    k = max(val_acc, key=val_acc.get)
    knn = KNNClassifier(temperature=temperature, num_classes=num_classes).fit(train["cls_1"], train["labels"])
    return k, knn.predict_proba(val["cls_1"], k=k), knn.predict_proba(test["cls_1"], k=k)


def linear_fit(feats: dict, num_classes: int, steps: int, batch_size: int, lrs, blocks: int, seed: int):
    """The linear-probe grid trained for about `steps` SGD steps; the head chosen on validation.
    Returns (ProbeResult, val probs, test probs, epochs)."""
    per_epoch = math.ceil(len(feats["train"]["labels"]) / batch_size)
    epochs = max(1, math.ceil(steps / per_epoch))
    best, _, grid = train_linear_grid(feats, num_classes, False, epochs, batch_size, list(lrs), blocks, seed)
    head = grid.heads[grid.names.index((best.feature, best.lr))]
    with torch.no_grad():
        val = head(variants(feats["val"], blocks)[best.feature]).softmax(-1)
        test = head(variants(feats["test"], blocks)[best.feature]).softmax(-1)
    return best, val, test, epochs


def sweep(feats: dict[str, dict[str, torch.Tensor]], shots: list[int | None], seeds: list[int], *, num_classes: int,
          ks=KS, temperature: float = 0.07, lrs=(1e-3, 5e-3, 1e-2, 5e-2), blocks: int = 4, epochs: int = 10,
          batch_size: int = 128, keep_at: int | None = None, log=print) -> tuple[list[dict], dict]:
    """kNN and linear grid for every shots x seed. Returns (rows, kept) where kept[(regime, seed)] =
    {"val": probs, "test": probs, ...} at `keep_at` shots (for the method table)."""
    y_train = feats["train"]["labels"].numpy()
    steps = epochs * math.ceil(len(y_train) / batch_size)  # the full-data recipe's number of SGD steps
    yv, yt = feats["val"]["labels"], feats["test"]["labels"]
    rows, kept = [], {}
    for k in shots:
        for seed in seeds:
            t0 = time.process_time()
            idx = np.arange(len(y_train)) if k is None else few_shot_indices(y_train, k, seed=seed)
            f = {"train": subset(feats["train"], idx), "val": feats["val"], "test": feats["test"]}
            best_k, kv, kt = knn_fit(f["train"], f["val"], f["test"], ks, temperature, num_classes)
            t1 = time.process_time()
            best, lv, lt, ep = linear_fit(f, num_classes, steps, batch_size, lrs, blocks, seed)
            t2 = time.process_time()
            base = {"shots": k, "seed": seed, "n_train": int(len(idx))}
            rows.append({**base, "regime": "knn", "k": best_k, "test/acc": _acc(kt, yt), "test/auroc": auroc(kt.log(), yt),
                         "val/acc": _acc(kv, yv), "cpu_s": round(t1 - t0, 3)})
            rows.append({**base, "regime": "linear", "feature": best.feature, "lr": best.lr, "epochs": ep,
                         "test/acc": _acc(lt, yt), "test/auroc": auroc(lt.log(), yt), "val/acc": _acc(lv, yv),
                         "cpu_s": round(t2 - t1, 3)})
            if keep_at is not None and k == keep_at:
                kept[("knn", seed)] = {"val": kv, "test": kt, "k": best_k, "cpu_s": t1 - t0, "n_train": len(idx)}
                kept[("linear", seed)] = {"val": lv, "test": lt, "feature": best.feature, "lr": best.lr,
                                          "epochs": ep, "cpu_s": t2 - t1, "n_train": len(idx),
                                          "trainable": best_dim(feats, best.feature, blocks) * num_classes + num_classes}
            log(f"shots {k or 'all'} seed {seed}: kNN (k {best_k}) acc {rows[-2]['test/acc']:.4f} auroc "
                f"{rows[-2]['test/auroc']:.4f}; linear ({best.feature}, lr {best.lr:g}, {ep} epochs) acc "
                f"{rows[-1]['test/acc']:.4f} auroc {rows[-1]['test/auroc']:.4f}")
    return rows, kept


def best_dim(feats: dict, feature: str, blocks: int) -> int:
    return int(variants({k: v[:1] for k, v in feats["train"].items() if k != "labels"}, blocks)[feature].shape[1])


def _acc(probs: torch.Tensor, y: torch.Tensor) -> float:
    return (probs.argmax(-1) == y).float().mean().item()


def write_scores(path: Path, val: torch.Tensor, yv: torch.Tensor, test: torch.Tensor, yt: torch.Tensor) -> None:
    """scores.npz: class probabilities and labels of the validation and test splits (atomic)."""
    from shared.fs import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, val_probs=val.numpy(), val_labels=yv.numpy(), test_probs=test.numpy(), test_labels=yt.numpy())


def parser():
    from medical.probe import parser as probe_parser

    p = probe_parser()
    p.description = "few-shot curves (kNN + linear-probe grid) on cached frozen-backbone features"
    p.add_argument("--shots", default="1,2,4,8,16,32,64,all", help="images per class, comma separated; 'all' = every image")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..n-1 per point (the k-shot draw and the heads' init)")
    p.add_argument("--table_shots", type=int, default=None, help="write run folders for the method table at this budget")
    p.add_argument("--label", default=None, help="the backbone's name in tables and plots (default: backbone + kwargs)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import lightning as L

    from medical.probe import select_device
    from medical.probes import cached_features
    from shared import backbones
    from shared.cli import parse_tool_args, write_json_atomic
    from shared.data import FeatureCache

    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    if not any(a == "--config" or a.startswith("--config=") for a in argv) and "-h" not in argv and "--help" not in argv:
        raise ValueError("medical.fewshot needs a recipe: --config domains/medical/probe.yaml --data.root <npz>")
    cfg = parse_tool_args(p, argv, Path(__file__).resolve().parent.parent / "domains" / "medical" / "probe.yaml")
    shots = parse_shots(cfg.shots)
    if cfg.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {cfg.seeds}")
    if cfg.table_shots is not None and cfg.table_shots not in shots:
        raise ValueError(f"--table_shots {cfg.table_shots} is not one of --shots {cfg.shots}")
    L.seed_everything(cfg.seed_everything, verbose=False)
    data = p.instantiate_classes(cfg).data
    if getattr(data, "few_shot", None):
        raise ValueError("--data.init_args.few_shot: leave it unset; medical.fewshot draws the subsets itself (--shots)")
    data.setup("fit")
    if getattr(data, "multilabel", False):
        raise ValueError(f"{cfg.data.init_args.root}: multi-label data; the few-shot sweep is for single-label tasks")
    cpu0, wall0 = time.process_time(), time.time()
    model = backbones.create(cfg.backbone, **cfg.backbone_kwargs).eval()
    model.to(select_device(cfg.accelerator))
    loaders = {"train": data.train_dataloader(), "val": data.val_dataloader(), "test": data.test_dataloader()}
    dataset_id = json.dumps(cfg.data.as_dict(), sort_keys=True, default=str)  # the key medical.probe uses too
    feats = cached_features(model, loaders, FeatureCache(Path(cfg.cache_dir).expanduser()),
                            getattr(data, "preprocessing", {}), dataset_id, cfg.blocks)
    model.cpu()
    extract_cpu, extract_wall = time.process_time() - cpu0, time.time() - wall0
    print(f"features of {sum(len(f['labels']) for f in feats.values())} images: {extract_wall:.1f} s wall, "
          f"{extract_cpu:.1f} s CPU (cached: a rerun reads them)")
    label = cfg.label or f"{cfg.backbone} {json.dumps(cfg.backbone_kwargs, sort_keys=True)}"
    seeds = list(range(cfg.seeds))
    cpu1 = time.process_time()
    rows, kept = sweep(feats, shots, seeds, num_classes=data.num_classes, ks=cfg.ks, temperature=cfg.temperature,
                       lrs=cfg.lrs, blocks=cfg.blocks, epochs=cfg.epochs, batch_size=cfg.batch_size,
                       keep_at=cfg.table_shots, log=lambda s: print(s, flush=True))
    out = Path(cfg.output_dir)
    recipe = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "output_dir", "seeds", "shots", "table_shots")}
    total = sum(q.numel() for q in model.parameters())
    for (regime, seed), kv in sorted(kept.items()):
        run = out / f"shots{cfg.table_shots}" / regime / f"seed{seed}"
        write_scores(run / "scores.npz", kv["val"], feats["val"]["labels"], kv["test"], feats["test"]["labels"])
        yv, yt = feats["val"]["labels"], feats["test"]["labels"]
        row = {"run": f"{out.name}_{regime}_shots{cfg.table_shots}_seed{seed}", "backbone": cfg.backbone,
               "backbone_label": label, "dataset": getattr(data, "name", "?"), "few_shot": cfg.table_shots,
               "method": "knn" if regime == "knn" else "linear_probe_grid", "regime": regime,
               "img_size": getattr(data, "img_size", None), "fold": None, "protocol": getattr(data, "protocol", None),
               "trainable_params": 0 if regime == "knn" else kv["trainable"], "total_params": total,
               "test/acc": _acc(kv["test"], yt), "test/auroc": auroc(kv["test"].log(), yt),
               "val/acc": _acc(kv["val"], yv), "val/auroc": auroc(kv["val"].log(), yv),
               "chosen": {k: kv[k] for k in ("k", "feature", "lr", "epochs") if k in kv},
               "cpu_seconds": round(kv["cpu_s"], 3), "n_train": int(kv["n_train"]),
               "feature_extraction": {"cpu_seconds": round(extract_cpu, 1), "wall_seconds": round(extract_wall, 1)},
               "config": {**recipe, "seed": seed, "few_shot": cfg.table_shots, "regime": regime}}
        write_json_atomic(run / "metrics.json", row)
    doc = {"backbone": cfg.backbone, "backbone_label": label, "dataset": getattr(data, "name", "?"),
           "img_size": getattr(data, "img_size", None), "num_classes": int(data.num_classes), "n_train_all": int(len(feats["train"]["labels"])),
           "n_val": int(len(feats["val"]["labels"])), "n_test": int(len(feats["test"]["labels"])),
           "shots": [k if k is not None else "all" for k in shots], "seeds": seeds,
           "feature_extraction": {"cpu_seconds": round(extract_cpu, 1), "wall_seconds": round(extract_wall, 1)},
           "sweep_cpu_seconds": round(time.process_time() - cpu1, 1), "config": recipe,
           "rows": [{**r, "shots": r["shots"] if r["shots"] is not None else "all"} for r in rows]}
    write_json_atomic(out / "fewshot.json", doc)
    print(f"few-shot rows written to {out / 'fewshot.json'}"
          + (f"; method-table runs under {out / f'shots{cfg.table_shots}'}" if kept else ""))
    return doc


if __name__ == "__main__":
    sys.exit(friendly(main))
