"""Dense metrics against hand-computed values, and Delta_m."""
from __future__ import annotations

import math

import pytest
import torch

from vision.metrics import TaskMeter, delta_m, max_f, f_counts, miou, confusion
from vision.tasks import make_task


def test_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion(pred, target, 3)
    # class 0: tp 1, fp 1 (label 2 -> 0), fn 1 (label 0 -> 1) -> 1/3 ; class 1: tp 3, fp 1 -> 3/4 ; class 2: tp 1, fn 1 -> 1/2
    assert miou(conf) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="label 5 outside"):
        confusion(pred, torch.full_like(target, 5), 3)


def test_classes_absent_everywhere_are_not_averaged():
    conf = confusion(torch.tensor([0, 0]), torch.tensor([0, 0]), 21)
    assert miou(conf) == 1.0


def test_max_f_by_hand():
    prob = torch.tensor([0.9, 0.8, 0.3, 0.2])
    target = torch.tensor([1, 0, 1, 0])
    # threshold in (0.3, 0.8]: P = 1/2, R = 1/2 -> F = 1/2 ; threshold in (0.8, 0.9]: P = 1, R = 1/2 ->
    # F = 1.3 * 0.5 / (0.3 + 0.5) = 0.8125 ; threshold <= 0.3: P = 2/3, R = 1 -> 1.3*(2/3)/(0.2+1) = 0.7222
    assert max_f(f_counts(prob, target)) == pytest.approx(0.8125)


def test_normals_and_depth_meters():
    m = TaskMeter(make_task("normals"))
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([0, 0, 2.0])   # 0 degrees off (+z)
    pred[0, :, 0, 1] = torch.tensor([1.0, 0, 0])   # 90 degrees off
    pred[0, :, 0, 2] = torch.tensor([1.0, 0, 0])   # label invalid (all zero): not scored
    label = torch.zeros(1, 3, 1, 3)
    label[0, 2, 0, :2] = 1
    m.update(pred, label)
    assert m.compute()["mean_angle"] == pytest.approx(45.0)
    d = TaskMeter(make_task("depth"))
    d.update(torch.tensor([[[[1.0, 2.0, 5.0]]]]), torch.tensor([[[[2.0, 2.0, 0.0]]]]))  # last pixel invalid
    d.update(torch.tensor([[[[3.0]]]]), torch.tensor([[[[1.0]]]]))
    assert d.compute()["rmse"] == pytest.approx(math.sqrt((1 + 0 + 4) / 3))


def test_saliency_meter_reports_maxf_and_miou():
    m = TaskMeter(make_task("saliency"))
    logits = torch.tensor([[[[4.0, -4.0], [4.0, -4.0]]]])
    m.update(logits, torch.tensor([[[1, 0], [0, 255]]]))
    r = m.compute()
    # at 0.5: pixel (0,0) tp, (0,1) tn, (1,0) fp, (1,1) ignored -> IoU fg 1/2, bg 1/2
    assert r["miou"] == pytest.approx(0.5)
    assert r["maxf"] == pytest.approx(1.3 * 0.5 * 1 / (0.3 * 0.5 + 1))


def test_delta_m_by_hand():
    res = {"semseg": 0.66, "normals": 13.5}
    single = {"semseg": 0.60, "normals": 15.0}
    # (+10% + 10%) / 2: normals are lower-is-better
    assert delta_m(res, single, {"semseg": False, "normals": True}) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no single-task baseline for task"):
        delta_m({"depth": 1.0}, single, {"depth": True})
    with pytest.raises(ValueError, match="baseline of \\['semseg'\\] is 0"):
        delta_m({"semseg": 0.5}, {"semseg": 0.0}, {"semseg": False})
