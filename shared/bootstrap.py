"""Percentile bootstrap intervals over test items (images, sentences): which differences are real.

One test set, one or more models (e.g. the seeds of a regime): the test items are resampled with
replacement, the metric is computed on every resample (for several score arrays: each on the SAME
resampled items, then averaged, which is the interval of the seed-mean metric), and the interval is
the (alpha/2, 1 - alpha/2) percentiles of those values (Efron's percentile interval). Seeded:
the same inputs and seed give the same interval.

    lo, hi = bootstrap_interval(accuracy, y, [probs], n_resamples=1000, seed=0)
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    """Top-1 accuracy of class scores (N, C) against labels (N,)."""
    return float((np.asarray(probs).argmax(-1) == np.asarray(y)).mean())


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC of `score` for y == 1: the Mann-Whitney statistic from average ranks (ties count one
    half), equal to sklearn's `roc_auc_score` and fast enough for thousands of resamples."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        raise ValueError("AUROC is undefined when only one class is present")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUROC of class 1's score (MedMNIST's headline AUC); more classes: macro one-vs-rest
    over the classes present in `y`."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1 or probs.shape[1] == 2:
        return binary_auroc(y == 1, probs if probs.ndim == 1 else probs[:, 1])
    return float(np.mean([binary_auroc(y == c, probs[:, c]) for c in np.unique(y)]))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"acc": accuracy, "auroc": auroc}


def bootstrap_interval(metric: Callable[[np.ndarray, np.ndarray], float], y, scores: Sequence,
                       n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """(low, high) percentile interval of the mean over `scores` of metric(y, s), resampling items.

    y: (N,) labels; scores: a list of (N, ...) score arrays for the same N items (one per seed).
    A resample in which the metric is undefined (e.g. AUROC of a resample with one class) is drawn
    again, so every one of the n_resamples values is defined.
    """
    y = np.asarray(y)
    arrays = [np.asarray(s) for s in scores]
    if not arrays:
        raise ValueError("bootstrap_interval needs at least one score array")
    n = len(y)
    if n < 2 or any(len(a) != n for a in arrays):
        raise ValueError(f"bootstrap_interval: labels have {n} items, score arrays have "
                         f"{[len(a) for a in arrays]} (need >= 2 items, the same in every array)")
    if n_resamples < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"n_resamples must be >= 1 and 0 < alpha < 1; got {n_resamples}, {alpha}")
    rng = np.random.default_rng(seed)
    values, tries = [], 0
    while len(values) < n_resamples:
        idx = rng.integers(0, n, size=n)
        tries += 1
        try:
            v = float(np.mean([metric(y[idx], a[idx]) for a in arrays]))
        except ValueError:  # e.g. sklearn: only one class present in this resample
            v = float("nan")
        if np.isfinite(v):
            values.append(v)
        elif tries > 10 * n_resamples:
            raise ValueError("bootstrap_interval: the metric is undefined on almost every resample")
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def paired_difference_interval(metric: Callable[[np.ndarray, np.ndarray], float], y, scores_a: Sequence,
                               scores_b: Sequence, n_resamples: int = 1000, seed: int = 0,
                               alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of mean metric(A) - mean metric(B) on the same resampled items: the two
    models are paired on each resample, so the interval excludes 0 only when the difference holds
    across test sets drawn like this one."""
    na = len(scores_a)
    y = np.asarray(y)
    arrays = [np.asarray(s) for s in scores_a] + [np.asarray(s) for s in scores_b]
    if na == 0 or len(arrays) == na:
        raise ValueError("paired_difference_interval needs at least one score array on each side")
    stacked = np.stack(arrays, axis=1)  # (N, models, ...): one resample picks the same items for all

    def stat(y_, s_):
        a = np.mean([metric(y_, s_[:, i]) for i in range(na)])
        b = np.mean([metric(y_, s_[:, i]) for i in range(na, s_.shape[1])])
        return a - b

    return bootstrap_interval(stat, y, [stacked], n_resamples, seed, alpha)


__all__ = ["accuracy", "auroc", "binary_auroc", "METRICS", "bootstrap_interval", "paired_difference_interval"]
