"""Dense-prediction metrics (pure functions + a split-level accumulator) and Delta_m.

- mIoU: confusion matrix pooled over the split, IoU per class averaged over classes that occur
  (in the labels or the predictions); label 255 is never scored.
- maxF: F-measure (beta^2 = 0.3, as saliency work reports) of the pooled pixels at each of 99
  thresholds, the best one; saliency also reports the mIoU of {background, foreground} at 0.5.
- mean angular error (degrees) of unit normals over valid pixels (label vector not all zero).
- RMSE of depth over valid pixels (label > 0), pooled over the split.
- Delta_m = mean_t (-1)^{lower-is-better_t} (M_t - M_single_t) / M_single_t, in percent.
"""
from __future__ import annotations

import math

import torch

from .tasks import IGNORE, Task

THRESHOLDS = torch.linspace(0.01, 0.99, 99)
BETA2 = 0.3


def confusion(pred: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) counts, rows = label, cols = prediction; label IGNORE skipped."""
    keep = target != IGNORE
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.max() >= n or t.min() < 0):
        raise ValueError(f"label {int(t.max())} outside the task's {n} classes")
    return torch.bincount(t * n + p, minlength=n * n).reshape(n, n)


def miou(conf: torch.Tensor) -> float:
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else float("nan")


def f_counts(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(99, 3) true positives, predicted positives, positives at each threshold; IGNORE skipped."""
    keep = target != IGNORE
    p, t = prob[keep].reshape(-1, 1), (target[keep] > 0).reshape(-1, 1)
    pos = p >= THRESHOLDS.to(p)
    return torch.stack([(pos & t).sum(0), pos.sum(0), t.sum(0).expand(len(THRESHOLDS))], 1).double()


def max_f(counts: torch.Tensor) -> float:
    tp, pp, ap = counts.unbind(1)
    prec, rec = tp / pp.clamp(min=1), tp / ap.clamp(min=1)
    f = (1 + BETA2) * prec * rec / (BETA2 * prec + rec).clamp(min=1e-12)
    return float(f.max())


def angles(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between (B, 3, H, W) predictions and labels at valid label pixels."""
    valid = target.abs().sum(1) > 0
    p = torch.nn.functional.normalize(pred.double(), dim=1)
    t = torch.nn.functional.normalize(target.double(), dim=1)
    cos = (p * t).sum(1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))[valid]


class TaskMeter:
    """Accumulates one task's statistics over a split; `compute()` gives its metrics."""

    def __init__(self, task: Task):
        self.task = task
        self.reset()

    def reset(self):
        t = self.task
        self.conf = torch.zeros(t.channels if t.kind == "classes" else 2, t.channels if t.kind == "classes" else 2,
                                dtype=torch.long)
        self.fc = torch.zeros(len(THRESHOLDS), 3, dtype=torch.double)
        self.sum = self.sq = 0.0
        self.n = 0

    @torch.no_grad()
    def update(self, out: torch.Tensor, target: torch.Tensor) -> None:
        """`out`: the decoder's (B, C, H, W) output; `target`: the label as the data module gives it."""
        out, target = out.detach().float().cpu(), target.detach().cpu()
        kind = self.task.kind
        if kind == "classes":
            self.conf += confusion(out.argmax(1), target, self.task.channels)
        elif kind == "binary":
            prob = out[:, 0].sigmoid()
            self.fc += f_counts(prob, target)
            self.conf += confusion((prob >= 0.5).long(), target, 2)
        elif kind == "normals":
            a = angles(out, target)
            self.sum += float(a.sum())
            self.n += a.numel()
        else:  # depth
            valid = target[:, 0] > 0
            d = (out[:, 0] - target[:, 0])[valid].double()
            self.sq += float((d * d).sum())
            self.n += d.numel()

    def compute(self) -> dict[str, float]:
        kind = self.task.kind
        if kind == "classes":
            return {"miou": miou(self.conf)}
        if kind == "binary":
            return {"maxf": max_f(self.fc), "miou": miou(self.conf)}
        if kind == "normals":
            return {"mean_angle": self.sum / self.n if self.n else float("nan")}
        return {"rmse": math.sqrt(self.sq / self.n) if self.n else float("nan")}


def delta_m(results: dict[str, float], single: dict[str, float], lower_is_better: dict[str, bool]) -> float:
    """Delta_m (%) of per-task metrics `results` against the single-task baselines `single`."""
    missing = sorted(set(results) - set(single))
    if missing:
        raise ValueError(f"Delta_m: no single-task baseline for task(s) {missing}")
    zero = sorted(t for t in results if single[t] == 0)
    if zero:
        raise ValueError(f"Delta_m: the single-task baseline of {zero} is 0; relative change undefined")
    terms = [(-1 if lower_is_better[t] else 1) * (results[t] - single[t]) / single[t] for t in results]
    return 100.0 * sum(terms) / len(terms)
