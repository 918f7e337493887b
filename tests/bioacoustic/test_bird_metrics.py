"""BirdSet's metrics (cmAP, T1-Acc, macro AUROC) pinned by hand-computed values, the options beside
them, and their independence of the installed torchmetrics version."""
import importlib
import sys

import pytest
import torch

from audio.birds import metrics as M
from audio.birds.probe import metric_definitions

# 5 windows x 3 classes. Class 2 is never present (BirdSet: its AP is nan, left out of cmAP; its
# AUROC is 0 and averaged in). Window 4 is a no-call window.
S = torch.tensor([[0.9, 0.8, 0.1],
                  [0.5, 0.6, 0.2],
                  [0.5, 0.3, 0.3],
                  [0.2, 0.7, 0.9],
                  [0.1, 0.4, 0.95]])
Y = torch.tensor([[1, 1, 0],
                  [0, 1, 0],
                  [1, 0, 0],
                  [0, 1, 0],
                  [0, 0, 0]])


def test_average_precision_by_hand_with_tied_scores():
    # class 0, by score: 0.9 (pos), then 0.5 twice (one pos, one neg: ONE threshold), 0.2, 0.1 (neg):
    # thresholds 0.9 -> P 1, R 1/2; 0.5 -> P 2/3, R 1 -> AP = 1/2 * 1 + 1/2 * 2/3
    assert M.average_precision(S[:, 0].double(), Y[:, 0]) == pytest.approx(0.5 + 1 / 3)
    # class 1: 0.8 (pos), 0.7 (pos), 0.6 (pos), 0.4, 0.3 -> AP 1
    assert M.average_precision(S[:, 1].double(), Y[:, 1]) == pytest.approx(1.0)
    # a tie that holds the only positive and a negative: precision 1/2 at recall 1, whatever the order
    assert M.average_precision(torch.tensor([0.5, 0.5, 0.1]).double(), torch.tensor([1, 0, 0])) == pytest.approx(0.5)
    assert M.average_precision(torch.tensor([0.5, 0.5, 0.1]).double(), torch.tensor([0, 1, 0])) == pytest.approx(0.5)
    assert torch.isnan(M.per_class_ap(S, Y)[2])  # no positive


def test_cmap_leaves_classes_without_positives_out():
    assert M.cmap(S, Y) == pytest.approx((5 / 6 + 1.0) / 2)  # BirdSet (torchmetrics 0.11 / 1.2): nanmean
    assert M.cmap(S, Y, "zero") == pytest.approx((5 / 6 + 1.0 + 0.0) / 3)  # torchmetrics >= 1.9's macro AP
    assert M.cmap(S, Y, min_positives=3) == pytest.approx(1.0)  # cmAP5-style: only class 1 has 3 positives
    assert M.cmap(S, torch.zeros_like(Y)) != M.cmap(S, torch.zeros_like(Y))  # nan: nothing defined


def test_top1_is_any_label_over_windows_with_a_label():
    # best classes: 0, 1, 0, 2, 2. Windows 0-3 have labels: hit (0 in {0,1}), hit, hit, miss (2 not in {1})
    assert M.top1(S, Y) == pytest.approx(3 / 4)
    # BirdSet before 2024-02-19: the FIRST label only, every window: window 0 first label 0 = best 0 (hit),
    # 1: 1 = 1 (hit), 2: 0 = 0 (hit), 3: 1 vs 2 (miss), 4 (no call, "first label" 0) vs 2 (miss)
    assert M.top1(S, Y, "first_label") == pytest.approx(3 / 5)
    y = torch.tensor([[0, 1, 1]])  # best class 2 is the second label: a hit, but not the first label
    s = torch.tensor([[0.1, 0.2, 0.3]])
    assert M.top1(s, y) == 1.0 and M.top1(s, y, "first_label") == 0.0
    assert M.top1(torch.tensor([[0.5, 0.5]]), torch.tensor([[1, 0]])) == 1.0  # a tie: the lowest index wins
    assert M.top1(S, torch.zeros_like(Y)) != M.top1(S, torch.zeros_like(Y))  # nan: no window with a label


def test_auroc_counts_an_undefined_class_as_zero():
    # class 0: positives 0.9, 0.5 vs negatives 0.5, 0.2, 0.1 -> pairs won 3 + (2 + 0.5) = 5.5 of 6
    # class 1: positives all above negatives -> 1; class 2: no positive -> 0 (torchmetrics 0.11 / 1.2)
    assert M.auroc(S, Y) == pytest.approx((5.5 / 6 + 1.0 + 0.0) / 3)
    assert M.auroc(S, Y, "defined") == pytest.approx((5.5 / 6 + 1.0) / 2)  # this suite's former definition
    assert M.roc_auc(torch.tensor([0.3, 0.4]).double(), torch.tensor([1, 1])) == 0.0  # no negative: 0 as well


def test_bird_scores_use_sigmoid_of_the_logits_and_name_the_options():
    out = M.bird_scores(torch.logit(S), Y)
    assert out["test/cmap"] == pytest.approx(M.cmap(S, Y)) and out["test/auroc"] == pytest.approx(M.auroc(S, Y))
    assert M.definition_label(M.DEFAULTS) == "reference"
    assert M.definition_label({**M.DEFAULTS, "top1": "first_label", "auroc": "defined"}) == "auroc=defined,top1=first_label"
    assert metric_definitions({"auroc": "defined"}) == {"cmap": "birdset", "top1": "birdset", "auroc": "defined"}
    with pytest.raises(ValueError, match="--metrics: unknown metric 'map'"):
        metric_definitions({"map": "birdset"})
    with pytest.raises(ValueError, match="--metrics.top1: unknown definition 'top3'"):
        metric_definitions({"top1": "top3"})


def test_metrics_do_not_need_torchmetrics(monkeypatch):
    """The values above hold whatever torchmetrics is installed (1.9 here counts a class without
    positives as AP 0): the module computes them itself."""
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # any import of it now fails
    fresh = importlib.reload(M)
    try:
        assert fresh.cmap(S, Y) == pytest.approx((5 / 6 + 1.0) / 2)
        assert fresh.auroc(S, Y) == pytest.approx((5.5 / 6 + 1.0) / 3)
    finally:
        monkeypatch.undo()
        importlib.reload(M)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="both be \\(N, C\\)"):
        M.cmap(S, Y[:, :2])
    with pytest.raises(ValueError, match="targets must be 0 or 1"):
        M.top1(S, 2 * Y)
    with pytest.raises(ValueError, match="cmap definition must be one of"):
        M.cmap(S, Y, "micro")
