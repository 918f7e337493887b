"""Frozen-backbone regimes of the DINOv2 radiology study: kNN and a grid of linear probes.

Features are extracted once per (backbone fingerprint, preprocessing, dataset) and cached on
disk (`shared.data.FeatureCache`); every probe then trains on the cached tensors, so a whole
grid of heads (feature variant x learning rate) costs one pass of the backbone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from shared.data import FeatureCache, extract_features_once
from shared.heads import KNNClassifier
from shared.peft import fingerprint

from .backbone import probe_features

LRS = (1e-3, 5e-3, 1e-2, 5e-2)
KS = (5, 20, 50, 100, 200)


def variants(feats: dict[str, torch.Tensor], n: int = 4) -> dict[str, torch.Tensor]:
    """The study's probe inputs: last 1 or n blocks' CLS, with or without average-pooled patches."""
    out = {}
    for k in ("cls_1", f"cls_{n}"):
        out[k] = feats[k]
        out[f"{k}+patch_mean"] = torch.cat([feats[k], feats["patch_mean"]], dim=-1)
    return out


def cached_features(model: nn.Module, loaders: dict[str, Iterable], cache: FeatureCache,
                    preprocessing: dict, dataset: str, n: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """{split: {feature name: (N, d), "labels": ...}}, computed once and cached on disk: every sample
    of each split once, in dataset order. Under `torchrun` every process extracts its share and
    process 0 gets the features (the others get None: `shared.data.extract_features_once`)."""
    model.eval()
    fp = fingerprint(model)
    out = {}
    for split, loader in loaders.items():
        # "ordered": one row per sample in dataset order (entries before it came from the training
        # loader's own sampler, shuffled or class-balanced with repeats)
        key = cache.key(fp, preprocessing, f"{dataset}:{split}", extractor=f"dinov2_probe_last{n}:ordered")
        device = next(model.parameters()).device  # the caller chose it (medical.probe: GPU when available)
        out[split] = extract_features_once(lambda x: probe_features(model, x, n), loader, device, cache, key)
    return out if all(v is not None for v in out.values()) else None


def knn_grid(train: dict, test: dict, feature: str = "cls_1", ks=KS, temperature: float = 0.07) -> dict[int, float]:
    """Top-1 accuracy of the cosine, temperature-weighted kNN classifier for every k."""
    y_train, y_test = train["labels"], test["labels"]
    if y_train.ndim != 1:
        raise ValueError("kNN here is single-label; use the linear probes for multi-label data")
    knn = KNNClassifier(temperature=temperature, num_classes=int(max(y_train.max(), y_test.max())) + 1)
    knn.fit(train[feature], y_train)
    probs = knn.predict_proba(test[feature], k=list(ks))
    return {k: (p.argmax(-1) == y_test).float().mean().item() for k, p in probs.items()}


def knn_auroc(train: dict, test: dict, k: int, feature: str = "cls_1", temperature: float = 0.07) -> float:
    """AUROC (binary: of class 1; else macro one-vs-rest over present classes) of the kNN's class
    probabilities at one k."""
    y_train, y_test = train["labels"], test["labels"]
    knn = KNNClassifier(temperature=temperature, num_classes=int(max(y_train.max(), y_test.max())) + 1)
    knn.fit(train[feature], y_train)
    probs = knn.predict_proba(test[feature], k=k).clamp_min(1e-12)
    return auroc(probs.log(), y_test)  # auroc() applies softmax: log-probabilities give the same probs


@dataclass
class ProbeResult:
    feature: str
    lr: float
    val: float
    test: float
    test_auroc: float | None = None  # single-label: AUROC (binary) / macro one-vs-rest AUROC, see `auroc`


class LinearGrid(nn.Module):
    """One linear head per (feature variant, lr), trained together on cached features."""

    def __init__(self, dims: dict[str, int], num_classes: int, lrs=LRS):
        super().__init__()
        self.names = [(f, lr) for f in dims for lr in lrs]
        self.heads = nn.ModuleList(nn.Linear(dims[f], num_classes) for f, _ in self.names)
        for h in self.heads:
            nn.init.normal_(h.weight, std=0.01)
            nn.init.zeros_(h.bias)

    def forward(self, feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [h(feats[f]) for h, (f, _) in zip(self.heads, self.names)]


def _score(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> float:
    if multilabel:  # macro AUROC over the labels with positives and negatives; unknown (NaN) left out
        from shared.module import macro_over_defined

        target = torch.nan_to_num(y.float(), nan=-1.0).long()
        return macro_over_defined(logits.sigmoid(), target, "auroc")[0]
    return multiclass_accuracy(logits, y, num_classes=logits.shape[1], average="micro").item()


def auroc(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Single-label AUROC: of class 1 for binary tasks (MedMNIST's headline metric), else the macro
    one-vs-rest AUROC over the classes present in `y` (an absent class is left out, not scored 0)."""
    from shared.module import macro_over_defined

    probs = logits.softmax(-1)
    onehot = F.one_hot(y.long(), logits.shape[1])
    if logits.shape[1] == 2:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    return macro_over_defined(probs, onehot, "auroc")[0]


def train_linear_grid(feats: dict[str, dict[str, torch.Tensor]], num_classes: int, multilabel: bool = False,
                      epochs: int = 10, batch_size: int = 128, lrs=LRS, n: int = 4, seed: int = 0,
                      resume: dict | None = None, on_epoch: Callable[[dict], None] | None = None):
    """SGD (momentum 0.9) + cosine, `epochs` over the cached train features; best head chosen on val.

    `on_epoch(state)` is called after every epoch with the loop's state (heads, optimizer, schedule,
    the batch order's generator, epochs done); `resume` (such a state) continues from it, to the
    result of an uninterrupted run. Returns (best ProbeResult, all results, the grid). Metric:
    accuracy (single-label) or macro AUROC.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    splits = {s: variants(feats[s], n) for s in ("train", "val", "test")}
    labels = {s: feats[s]["labels"] for s in splits}
    dims = {k: v.shape[1] for k, v in splits["train"].items()}
    grid = LinearGrid(dims, num_classes, lrs)
    opt = torch.optim.SGD([{"params": h.parameters(), "lr": lr} for h, (_, lr) in zip(grid.heads, grid.names)],
                          momentum=0.9, weight_decay=0.0)
    n_train = len(labels["train"])
    steps = epochs * math.ceil(n_train / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    done = 0
    if resume is not None:
        grid.load_state_dict(resume["grid"])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        g.set_state(resume["generator"])
        done = int(resume["epochs_done"])
    for epoch in range(done, epochs):
        order = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, batch_size):
            idx = order[i:i + batch_size]
            batch = {k: v[idx] for k, v in splits["train"].items()}
            y = labels["train"][idx]
            outs = grid(batch)
            if multilabel:
                from medical.data import masked_bce  # NaN targets (CheXpert "ignore") are masked

                loss_fn = lambda o: masked_bce(o, y.float())  # noqa: E731
            else:
                loss_fn = lambda o: F.cross_entropy(o, y)  # noqa: E731
            loss = sum(loss_fn(o) for o in outs)  # heads are independent: the sum trains each on its own loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch({"grid": grid.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                      "generator": g.get_state(), "epochs_done": epoch + 1})
    results = []
    with torch.no_grad():
        val_out, test_out = grid(splits["val"]), grid(splits["test"])
        for (f, lr), vo, to in zip(grid.names, val_out, test_out):
            results.append(ProbeResult(f, lr, _score(vo, labels["val"], multilabel), _score(to, labels["test"], multilabel),
                                       None if multilabel else auroc(to, labels["test"])))
    best = max(results, key=lambda r: (r.val, -r.lr))
    return best, results, grid


def describe(results: list[ProbeResult]) -> str:
    lines = ["| feature | lr | val | test |", "|---|---|---|---|"]
    for r in sorted(results, key=lambda r: -r.val):
        lines.append(f"| {r.feature} | {r.lr:g} | {r.val:.4f} | {r.test:.4f} |")
    return "\n".join(lines)


__all__ = ["variants", "cached_features", "knn_grid", "train_linear_grid", "LinearGrid", "ProbeResult",
           "describe"]
