"""Dense-prediction metrics as torchmetrics `Metric`s whose states are sums, and Delta_m.

Every state is a sum over images or pixels (`dist_reduce_fx="sum"`), so under DDP torchmetrics
adds the ranks' states before `compute()` and the result equals one process scoring the whole
split (provided no sample is scored twice: the evaluation loaders must not pad the last share).

Each task kind has named definitions; "reference" follows the evaluation code of the multi-task
dense benchmark (Vandenhende et al., "Multi-Task Learning for Dense Prediction Tasks: A Survey",
public Multi-Task-Learning-PyTorch code, evaluation/eval_*.py, inherited from ASTMT), i.e. what
the Polyhistor line of work reports; the others are the variants this suite used before.

classes (semseg, human_parts)
    reference        tp / fp / fn per class accumulated over the split (label 255 never scored),
                     IoU = tp / max(tp + fp + fn, 1e-8) for EVERY class, so a class absent from
                     both labels and predictions counts 0; mIoU = mean over all classes.
                     human_parts: images whose label is a single value, 0 (no person) or 255 (no
                     label), are skipped.
    present_classes  the same confusion matrix, mean over the classes that occur in the labels or
                     the predictions; no image skipped.
binary (saliency; edges)
    reference        the prediction quantised like the saved 8-bit PNG (floor(255 sigmoid) / 255),
                     thresholded (>) at the 15 thresholds linspace(0.2, 0.9); per image precision
                     tp / (tp + fp + 1e-12), recall tp / (tp + fn + 1e-12) and foreground Jaccard
                     (1 when label and prediction are both empty), each averaged over the images;
                     maxF = max over thresholds of 2 P R / (P + R + 1e-12) (that is F1: the
                     reference does not use beta^2 = 0.3); miou = max over thresholds of the mean
                     Jaccard. Pixels labelled 255 are void; an image with no labelled pixel is
                     skipped. Edges have no reference here (the benchmark scores them with the
                     SEISM boundary toolbox), so they always use "pooled".
    pooled           pixels pooled over the split at 99 thresholds 0.01..0.99 (>=), F-beta with
                     beta^2 = 0.3, the best threshold; miou = mIoU of {background, foreground}
                     at 0.5.
normals
    reference        pixels whose label vector is non-zero; the prediction normalised and
                     quantised like the saved 8-bit PNG ((n + 1) * 255 / 2, truncated, decoded,
                     renormalised), the label normalised; angle in degrees. Reports the mean (the
                     headline, what Delta_m uses), median (to 0.01 degree, from a histogram),
                     RMSE and % of pixels under 11.25 / 22.5 / 30 degrees.
    float            the same pixels and statistics without the 8-bit quantisation.
depth
    reference        pixels whose label is not 0; predictions clamped to >= 1e-9; RMSE and log
                     RMSE pooled over the split.
    unclamped        pixels whose label is > 0, raw predictions; RMSE.

Delta_m = mean_t (-1)^{lower-is-better_t} (M_t - M_single_t) / M_single_t, in percent.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from .tasks import IGNORE, Task

REFERENCE = "reference"
DEFINITIONS: dict[str, tuple[str, ...]] = {
    "classes": (REFERENCE, "present_classes"),
    "binary": (REFERENCE, "pooled"),
    "normals": (REFERENCE, "float"),
    "depth": (REFERENCE, "unclamped"),
}
# the definition each task kind had before the reference became the default (runs without a
# recorded definition used these)
PREVIOUS = {"classes": "present_classes", "binary": "pooled", "normals": "float", "depth": "unclamped"}
# tasks whose reference metric is not implemented: (the definition they use, why)
NO_REFERENCE = {"edges": ("pooled", "the reference scores edges with the SEISM boundary toolbox (odsF with a "
                                    "matching tolerance, MATLAB), which is not implemented here")}

REF_THRESHOLDS = torch.linspace(0.2, 0.9, 15, dtype=torch.float64)
POOLED_THRESHOLDS = torch.linspace(0.01, 0.99, 99)
BETA2 = 0.3  # the pooled variant's F-beta
ANGLE_BIN = 0.01  # degrees: resolution of the normals median
WITHIN = (11.25, 22.5, 30.0)


def resolve_definitions(tasks: dict[str, Task], spec: str | dict[str, str] | None = None) -> dict[str, str]:
    """{task: definition name} from `spec`: None / "reference" (the reference wherever one is
    implemented), "previous" (every task's former variant), one option name for every task, or
    a mapping {task: name} (tasks left out get the reference)."""
    def default(t: Task) -> str:
        return NO_REFERENCE[t.name][0] if t.name in NO_REFERENCE else REFERENCE

    def check(t: Task, name) -> str:
        options = DEFINITIONS[t.kind]
        if t.name in NO_REFERENCE:
            options = tuple(o for o in options if o != REFERENCE)
            if name == REFERENCE:
                raise ValueError(f"eval.definition: {t.name} has no reference metric here ({NO_REFERENCE[t.name][1]}); "
                                 f"its definitions: {', '.join(options)}")
        if name not in options:
            raise ValueError(f"eval.definition: {name!r} is not a definition of {t.name} (its definitions: "
                             f"{', '.join(options)}); give a mapping {{task: definition}} to choose per task")
        return name

    if spec is None or spec == REFERENCE:
        return {n: default(t) for n, t in tasks.items()}
    if spec == "previous":
        return {n: PREVIOUS[t.kind] for n, t in tasks.items()}
    if isinstance(spec, str):
        return {n: check(t, spec) for n, t in tasks.items()}
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(tasks))
        if unknown:
            raise ValueError(f"eval.definition: tasks {unknown} are not in this run (its tasks: {list(tasks)})")
        return {n: check(t, spec[n]) if n in spec else default(t) for n, t in tasks.items()}
    raise ValueError(f"eval.definition must be a name or a mapping {{task: name}}, got {spec!r}")


def recorded_definitions(definitions: dict[str, str], normals_mask: bool | None = None) -> dict[str, str]:
    """The definitions as metrics.json / bundles record them: PASCAL-Context normals scored
    without the reference's class mask (no full label maps, `normals_mask` False) are
    "<definition>_unmasked", so a table never mixes them with masked ones."""
    out = dict(definitions)
    if normals_mask is False and "normals" in out:
        out["normals"] += "_unmasked"
    return out


def run_definitions(run: dict) -> dict[str, str]:
    """{task: definition} of a metrics.json row; rows written before definitions were recorded
    used every task kind's previous variant."""
    from .tasks import make_task

    if isinstance(run.get("definition"), dict):
        return run["definition"]
    return {t: PREVIOUS[make_task(t).kind] for t in run["tasks"]}


# --- pure helpers -----------------------------------------------------------------------------
def confusion(pred: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) counts, rows = label, cols = prediction; label IGNORE skipped."""
    keep = target != IGNORE
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.max() >= n or t.min() < 0):
        raise ValueError(f"label {int(t.max() if t.max() >= n else t.min())} outside the task's {n} classes")
    return torch.bincount(t * n + p, minlength=n * n).reshape(n, n)


def miou(conf: torch.Tensor) -> float:
    """Mean IoU over the classes present in the labels or the predictions ("present_classes")."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else float("nan")


def miou_reference(conf: torch.Tensor) -> float:
    """Mean IoU over every class, tp / max(tp + fp + fn, 1e-8): an absent class counts 0."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return float((tp / union.clamp(min=1e-8)).mean())


def f_counts(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(99, 3) true positives, predicted positives, positives at each pooled threshold; IGNORE skipped."""
    keep = target != IGNORE
    p, t = prob[keep].reshape(-1, 1), (target[keep] == 1).reshape(-1, 1)
    pos = p >= POOLED_THRESHOLDS.to(p)
    return torch.stack([(pos & t).sum(0), pos.sum(0), t.sum(0).expand(len(POOLED_THRESHOLDS))], 1).double()


def max_f(counts: torch.Tensor) -> float:
    """Pooled F-beta (beta^2 = 0.3) at the best threshold of `f_counts` sums."""
    tp, pp, ap = counts.double().unbind(1)
    prec, rec = tp / pp.clamp(min=1), tp / ap.clamp(min=1)
    f = (1 + BETA2) * prec * rec / (BETA2 * prec + rec).clamp(min=1e-12)
    return float(f.max())


def png_probability(logits: torch.Tensor) -> torch.Tensor:
    """The probability as the reference reads it back from its 8-bit PNG: floor(255 sigmoid) / 255."""
    q = torch.floor(255 / (1 + torch.exp(-logits.float()))).clamp(0, 255)
    return (q / 255).double()


def per_image_pr(prob: torch.Tensor, target: torch.Tensor, thresholds: torch.Tensor = REF_THRESHOLDS):
    """Per image and threshold: precision, recall, Jaccard (each (B, T)) and which images have a
    labelled pixel (B,). `prob` (B, H, W) is compared with `>`; label 255 is void."""
    b = prob.shape[0]
    valid = (target != IGNORE).reshape(b, 1, -1)
    gt = (target == 1).reshape(b, 1, -1) & valid
    pred = (prob.reshape(b, 1, -1) > thresholds.to(prob).reshape(1, -1, 1)) & valid
    tp = (pred & gt).sum(-1).double()
    fp = (pred & ~gt).sum(-1).double()
    fn = (~pred & gt).sum(-1).double()
    prec, rec = tp / (tp + fp + 1e-12), tp / (tp + fn + 1e-12)
    union = tp + fp + fn
    jac = torch.where(union > 0, tp / union.clamp(min=1), torch.ones_like(tp))
    return prec, rec, jac, valid.flatten(1).any(1)


def angles(pred: torch.Tensor, target: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """Angles in degrees between (B, 3, H, W) predictions and labels at pixels whose label vector
    is non-zero; `quantize`: the prediction passes through the reference's 8-bit PNG first."""
    target = target.double()
    valid = target.norm(dim=1) != 0
    p = F.normalize(pred.double(), dim=1)
    if quantize:
        p = torch.floor((p + 1) * 255 / 2).clamp(0, 255) * 2 / 255 - 1
        p = p / (p.norm(dim=1, keepdim=True) + 1e-12)
    t = target / (target.norm(dim=1, keepdim=True) + 1e-12)
    cos = (p * t).sum(1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))[valid]


def _div(a, b) -> float:
    return float(a) / float(b) if float(b) else float("nan")


# --- meters -----------------------------------------------------------------------------------
class DenseMetric(Metric):
    """One task's metric over a split; `update(out, label)` with the decoder's (B, C, H, W) output
    and the label as the data module gives it; `compute()` -> {metric: float}."""

    full_state_update = False

    def __init__(self, task: Task, definition: str = REFERENCE, **kwargs: Any):
        super().__init__(**kwargs)
        options = tuple(o for o in DEFINITIONS[task.kind] if not (o == REFERENCE and task.name in NO_REFERENCE))
        if definition not in options:
            raise ValueError(f"{task.name}: unknown metric definition {definition!r}; available: {', '.join(options)}")
        self.task, self.definition = task, definition


class ClassMetric(DenseMetric):
    def __init__(self, task: Task, definition: str = REFERENCE, **kwargs):
        super().__init__(task, definition, **kwargs)
        n = task.channels
        self.skip_uniform = definition == REFERENCE and task.name == "human_parts"
        self.add_state("conf", torch.zeros(n, n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, out: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = out.detach().argmax(1), target.detach()
        if self.skip_uniform:  # the reference skips parts labels that are all background or all unlabelled
            flat = target.flatten(1)
            first = flat[:, 0]
            uniform = (flat == first[:, None]).all(1) & ((first == 0) | (first == IGNORE))
            pred, target = pred[~uniform], target[~uniform]
        self.conf += confusion(pred, target, self.task.channels)

    def compute(self) -> dict[str, float]:
        return {"miou": miou_reference(self.conf) if self.definition == REFERENCE else miou(self.conf)}


class BinaryMetric(DenseMetric):
    def __init__(self, task: Task, definition: str = REFERENCE, **kwargs):
        super().__init__(task, definition, **kwargs)
        if definition == REFERENCE:
            t = len(REF_THRESHOLDS)
            for s in ("prec", "rec", "jac"):
                self.add_state(s, torch.zeros(t, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        else:
            self.add_state("fc", torch.zeros(len(POOLED_THRESHOLDS), 3, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("conf", torch.zeros(2, 2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, out: torch.Tensor, target: torch.Tensor) -> None:
        logits, target = out.detach()[:, 0], target.detach()
        if self.definition == REFERENCE:
            prec, rec, jac, labelled = per_image_pr(png_probability(logits), target)
            self.prec += prec[labelled].sum(0)
            self.rec += rec[labelled].sum(0)
            self.jac += jac[labelled].sum(0)
            self.images += labelled.sum()
        else:
            prob = logits.float().sigmoid()
            self.fc += f_counts(prob, target).long()
            self.conf += confusion((prob >= 0.5).long(), target, 2)

    def compute(self) -> dict[str, float]:
        if self.definition != REFERENCE:
            return {"maxf": max_f(self.fc), "miou": miou(self.conf)}
        n = int(self.images)
        if not n:
            return {"maxf": float("nan"), "miou": float("nan")}
        p, r = self.prec / n, self.rec / n
        f = 2 * p * r / (p + r + 1e-12)
        return {"maxf": float(f.max()), "miou": float((self.jac / n).max())}


class NormalsMetric(DenseMetric):
    BINS = int(round(180 / ANGLE_BIN))

    def __init__(self, task: Task, definition: str = REFERENCE, **kwargs):
        super().__init__(task, definition, **kwargs)
        self.add_state("angle_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("within", torch.zeros(len(WITHIN), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("hist", torch.zeros(self.BINS, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, out: torch.Tensor, target: torch.Tensor) -> None:
        a = angles(out.detach(), target.detach(), quantize=self.definition == REFERENCE)
        self.angle_sum += a.sum()
        self.sq += (a * a).sum()
        self.n += a.numel()
        self.within += torch.stack([(a < w).sum() for w in WITHIN])
        self.hist += torch.bincount((a / ANGLE_BIN).long().clamp(max=self.BINS - 1), minlength=self.BINS)

    def median(self) -> float:
        """The median angle from the histogram (linear within a bin; within ANGLE_BIN degrees)."""
        n = int(self.n)
        if not n:
            return float("nan")
        cum = self.hist.cumsum(0)

        def kth(k: int) -> float:  # the k-th smallest (1-based)
            b = int(torch.searchsorted(cum, torch.tensor(k, device=cum.device)))
            before = int(cum[b - 1]) if b else 0
            return (b + (k - before - 0.5) / int(self.hist[b])) * ANGLE_BIN

        return kth((n + 1) // 2) if n % 2 else (kth(n // 2) + kth(n // 2 + 1)) / 2

    def compute(self) -> dict[str, float]:
        n = self.n
        out = {"mean_angle": _div(self.angle_sum, n), "median_angle": self.median(),
               "rmse_angle": math.sqrt(_div(self.sq, n)) if int(n) else float("nan")}
        for w, c in zip(WITHIN, self.within):
            out[f"within_{w:g}"] = 100 * _div(c, n)
        return out


class DepthMetric(DenseMetric):
    def __init__(self, task: Task, definition: str = REFERENCE, **kwargs):
        super().__init__(task, definition, **kwargs)
        self.add_state("sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("log_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, out: torch.Tensor, target: torch.Tensor) -> None:
        pred, label = out.detach()[:, 0].double(), target.detach()[:, 0].double()
        if self.definition == REFERENCE:
            valid = label != 0
            pred = pred.clamp(min=1e-9)
            self.log_sq += ((label[valid].log() - pred[valid].log()) ** 2).sum()
        else:
            valid = label > 0
        self.sq += ((label - pred)[valid] ** 2).sum()
        self.n += valid.sum()

    def compute(self) -> dict[str, float]:
        if not int(self.n):
            return {"rmse": float("nan")} | ({"log_rmse": float("nan")} if self.definition == REFERENCE else {})
        out = {"rmse": math.sqrt(_div(self.sq, self.n))}
        if self.definition == REFERENCE:
            out["log_rmse"] = math.sqrt(_div(self.log_sq, self.n))
        return out


METRICS = {"classes": ClassMetric, "binary": BinaryMetric, "normals": NormalsMetric, "depth": DepthMetric}


def make_meter(task: Task, definition: str | None = None) -> DenseMetric:
    """The metric of `task` under `definition` (default: the reference where implemented)."""
    if definition is None:
        definition = resolve_definitions({task.name: task})[task.name]
    return METRICS[task.kind](task, definition)


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
