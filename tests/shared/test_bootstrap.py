"""shared.bootstrap: percentile bootstrap intervals over test items, checked against hand computations,
the normal approximation and scipy.stats.bootstrap."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from shared.bootstrap import accuracy, auroc, bootstrap_interval, paired_difference_interval


def _probs(correct: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Class scores (N, 2) whose argmax is y where correct, else the other class."""
    pred = np.where(correct, y, 1 - y)
    p = np.full((len(y), 2), 0.2)
    p[np.arange(len(y)), pred] = 0.8
    return p


def test_two_items_hand_computation():
    # one right, one wrong: a resample holds 0, 1 or 2 right items with probability 1/4, 1/2, 1/4,
    # so the 2.5% / 97.5% percentiles of the resampled accuracy are exactly 0 and 1
    y = np.array([0, 1])
    p = _probs(np.array([True, False]), y)
    assert bootstrap_interval(accuracy, y, [p], n_resamples=2000) == (0.0, 1.0)
    # both right: every resample scores 1
    assert bootstrap_interval(accuracy, y, [_probs(np.array([True, True]), y)], n_resamples=50) == (1.0, 1.0)


def test_accuracy_interval_matches_normal_approximation_and_scipy():
    rng = np.random.default_rng(1)
    n = 468
    y = np.arange(n) % 2
    correct = np.zeros(n, bool)
    correct[rng.permutation(n)[:398]] = True  # accuracy 0.8504
    p = _probs(correct, y)
    lo, hi = bootstrap_interval(accuracy, y, [p], n_resamples=4000, seed=0)
    acc = 398 / n
    half = 1.959964 * np.sqrt(acc * (1 - acc) / n)  # the binomial normal approximation, by hand
    assert lo == pytest.approx(acc - half, abs=0.006) and hi == pytest.approx(acc + half, abs=0.006)
    ref = stats.bootstrap((correct.astype(float),), np.mean, n_resamples=4000, method="percentile",
                          random_state=np.random.default_rng(0)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.006) and hi == pytest.approx(ref.high, abs=0.006)


def test_auroc_point_and_interval_against_sklearn_and_scipy():
    rng = np.random.default_rng(2)
    y = np.arange(300) % 2
    score = y * 0.8 + rng.normal(size=300)
    p = np.stack([1 - score, score], 1)
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, score))
    tied = np.round(score, 0)  # ties count one half, as sklearn's
    assert auroc(y, np.stack([-tied, tied], 1)) == pytest.approx(roc_auc_score(y, tied))
    three = rng.random((300, 3))
    three /= three.sum(1, keepdims=True)
    y3 = np.arange(300) % 3
    assert auroc(y3, three) == pytest.approx(roc_auc_score(y3, three, multi_class="ovr"))
    lo, hi = bootstrap_interval(auroc, y, [p], n_resamples=400, seed=3)
    ref = stats.bootstrap((y, score), lambda a, b: roc_auc_score(a, b), paired=True, vectorized=False,
                          n_resamples=400, method="percentile", random_state=np.random.default_rng(3)).confidence_interval
    assert lo < auroc(y, p) < hi
    assert lo == pytest.approx(ref.low, abs=0.015) and hi == pytest.approx(ref.high, abs=0.015)


def test_seeded_mean_over_models_and_paired_difference():
    rng = np.random.default_rng(4)
    y = np.arange(200) % 2
    a = _probs(rng.random(200) < 0.9, y)
    b = _probs(rng.random(200) < 0.7, y)
    one = bootstrap_interval(accuracy, y, [a], seed=5)
    assert one == bootstrap_interval(accuracy, y, [a], seed=5)  # seeded
    assert one != bootstrap_interval(accuracy, y, [a], seed=6)
    lo, hi = bootstrap_interval(accuracy, y, [a, b], seed=5)  # the mean of the two models' accuracies
    assert lo < (accuracy(y, a) + accuracy(y, b)) / 2 < hi
    assert paired_difference_interval(accuracy, y, [a], [a], n_resamples=200) == (0.0, 0.0)
    dlo, dhi = paired_difference_interval(accuracy, y, [a], [b], n_resamples=500)
    assert 0.0 < dlo < accuracy(y, a) - accuracy(y, b) < dhi


def test_bad_input_is_one_clear_error():
    y = np.array([0, 1, 0])
    with pytest.raises(ValueError, match="3 items"):
        bootstrap_interval(accuracy, y, [np.zeros((2, 2))])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_interval(accuracy, y, [])
