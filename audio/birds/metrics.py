"""BirdSet's multi-label metrics, computed here (no torchmetrics) so that a value never depends on the
installed torchmetrics version. Scores are (N, C) (probabilities or logits: every metric here is
rank-based per class), targets (N, C) in {0, 1}.

Reference: BirdSet `birdset/modules/metrics/multilabel.py` (the `cmAP`, `TopKAccuracy` classes and
torchmetrics' macro `AUROC` in `MultilabelMetricsConfig`), as evaluated with the torchmetrics
versions BirdSet (1.2.0) and Bird-MAE (0.11.4) pin:

- `cmap` ("birdset"): per class, the average precision sum_k (R_k - R_{k-1}) P_k over the distinct
  score thresholds (torchmetrics' `MultilabelAveragePrecision(thresholds=None)`, sklearn's
  `average_precision_score`); a class without a positive window has recall 0/0 = nan there and is
  left out of the macro mean (`nanmean`). `min_positives=5` gives BirdSet's `cmAP5`. Newer
  torchmetrics (1.9 measured) return AP 0 for such a class and average it in: "zero" is that variant.
- `top1` ("birdset"): `TopKAccuracy(topk=1)`: a window is a hit when its highest-scoring class is
  ANY of its labels; windows without a label are left out (`include_nocalls=False`). "first_label"
  is BirdSet before 2024-02-19 (commit 5e72e35): a hit only when the highest-scoring class is the
  window's FIRST label (`targets.argmax`), every window counted (a no-call window's "first label" is
  class 0). Ties: the lowest class index wins (`torch.argmax`).
- `auroc` ("birdset"): torchmetrics' macro `MultilabelAUROC(thresholds=None)`: a class without a
  positive (or without a negative) gets a true (false) positive rate of 0 everywhere, AUROC 0, and
  is averaged in as 0. "defined" (this suite's former definition, `shared.module.macro_over_defined`)
  averages only the classes with both.
"""
from __future__ import annotations

import torch

CMAP = ("birdset", "zero")
TOP1 = ("birdset", "first_label")
AUROC = ("birdset", "defined")
DEFAULTS = {"cmap": "birdset", "top1": "birdset", "auroc": "birdset"}


def _check(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores, target = torch.as_tensor(scores).double(), torch.as_tensor(target)
    if scores.ndim != 2 or scores.shape != target.shape:
        raise ValueError(f"scores and targets must both be (N, C), got {tuple(scores.shape)} and {tuple(target.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if not ((target == 0) | (target == 1)).all():
        raise ValueError("targets must be 0 or 1")
    return scores, target.long()


def _curve(s: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative (true positives, false positives) at each distinct threshold, highest first."""
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order]
    last = torch.ones_like(s, dtype=torch.bool)  # the last sample of each run of tied scores
    last[:-1] = s[1:] != s[:-1]
    tps = torch.cumsum(y, 0)[last].double()
    fps = torch.cumsum(1 - y, 0)[last].double()
    return tps, fps


def average_precision(s: torch.Tensor, y: torch.Tensor) -> float:
    """AP of one class: sum over thresholds of (recall step) x precision; nan without positives."""
    tps, fps = _curve(s, y)
    if tps[-1] <= 0:
        return float("nan")
    recall, precision = tps / tps[-1], tps / (tps + fps)
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * precision).sum())


def roc_auc(s: torch.Tensor, y: torch.Tensor) -> float:
    """Trapezoidal area under the ROC curve of one class; 0 without positives or without negatives
    (torchmetrics 0.11 / 1.2 set that rate to 0 everywhere)."""
    tps, fps = _curve(s, y)
    if tps[-1] <= 0 or fps[-1] <= 0:
        return 0.0
    tpr = torch.cat([tps.new_zeros(1), tps / tps[-1]])
    fpr = torch.cat([fps.new_zeros(1), fps / fps[-1]])
    return float(torch.trapezoid(tpr, fpr))


def per_class_ap(scores, target) -> torch.Tensor:
    """(C,) AP per class, nan for a class without a positive window."""
    s, y = _check(scores, target)
    return torch.tensor([average_precision(s[:, c], y[:, c]) for c in range(s.shape[1])], dtype=torch.float64)


def cmap(scores, target, definition: str = "birdset", min_positives: int = 1) -> float:
    """Class-wise mean AP over the classes with at least `min_positives` positive windows ("birdset";
    nan when there is none), or over every class with AP 0 for classes without a positive ("zero")."""
    if definition not in CMAP:
        raise ValueError(f"cmap definition must be one of {CMAP}, got {definition!r}")
    ap = per_class_ap(scores, target)
    if definition == "zero":
        return float(torch.nan_to_num(ap, nan=0.0).mean())
    keep = torch.as_tensor(target).sum(0) >= max(1, min_positives)
    return float(ap[keep].mean()) if keep.any() else float("nan")


def top1(scores, target, definition: str = "birdset") -> float:
    """Top-1 accuracy ("birdset": the best class is any label, windows with a label; "first_label":
    it is the first label, every window); nan when no window counts."""
    if definition not in TOP1:
        raise ValueError(f"top1 definition must be one of {TOP1}, got {definition!r}")
    s, y = _check(scores, target)
    best = s.argmax(1)  # (N,): the lowest index among tied maxima
    if definition == "first_label":
        return float((best == y.argmax(1)).double().mean()) if len(y) else float("nan")
    keep = y.sum(1) > 0
    if not keep.any():
        return float("nan")
    return float(y[keep].gather(1, best[keep, None]).double().mean())


def auroc(scores, target, definition: str = "birdset") -> float:
    """Macro AUROC ("birdset": every class, an undefined one counts 0; "defined": only the classes
    with positives and negatives, nan when there is none)."""
    if definition not in AUROC:
        raise ValueError(f"auroc definition must be one of {AUROC}, got {definition!r}")
    s, y = _check(scores, target)
    values = torch.tensor([roc_auc(s[:, c], y[:, c]) for c in range(s.shape[1])], dtype=torch.float64)
    if definition == "birdset":
        return float(values.mean())
    pos = y.sum(0)
    keep = (pos > 0) & (pos < len(y))
    return float(values[keep].mean()) if keep.any() else float("nan")


def definition_label(definitions: dict[str, str]) -> str:
    """"reference" when every metric follows BirdSet's code, else the options, e.g. "top1=first_label"."""
    odd = [f"{k}={v}" for k, v in sorted(definitions.items()) if DEFAULTS.get(k) != v]
    return ",".join(odd) if odd else "reference"


def bird_scores(logits: torch.Tensor, target: torch.Tensor, definitions: dict[str, str] | None = None
                ) -> dict[str, float]:
    """test/cmap, test/auroc, test/top1 of sigmoid(logits) (BirdSet's `output_activation`)."""
    d = {**DEFAULTS, **(definitions or {})}
    p = torch.as_tensor(logits).float().sigmoid()
    return {"test/cmap": cmap(p, target, d["cmap"]), "test/auroc": auroc(p, target, d["auroc"]),
            "test/top1": top1(p, target, d["top1"])}


__all__ = ["CMAP", "TOP1", "AUROC", "DEFAULTS", "average_precision", "roc_auc", "per_class_ap", "cmap", "top1",
           "auroc", "definition_label", "bird_scores"]
