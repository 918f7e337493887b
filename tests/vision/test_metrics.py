"""Dense metrics against hand-computed values (the multi-task benchmark's reference definitions and
our former variants), sum-reducible states (what DDP needs), and Delta_m."""
from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

from vision.metrics import (DEFINITIONS, confusion, delta_m, make_meter, miou, miou_reference, recorded_definitions,
                            resolve_definitions, run_definitions)
from vision.tasks import make_task


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float32)
    return torch.log(p / (1 - p))


def test_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion(pred, target, 3)
    # class 0: tp 1, fp 1 (label 2 -> 0), fn 1 (label 0 -> 1) -> 1/3 ; class 1: tp 3, fp 1 -> 3/4 ; class 2: tp 1, fn 1 -> 1/2
    assert miou(conf) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert miou_reference(conf) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)  # every class occurs: the same
    with pytest.raises(ValueError, match="label 5 outside"):
        confusion(pred, torch.full_like(target, 5), 3)


def one_hot_logits(pred: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, n).permute(0, 3, 1, 2).float()


def test_semseg_reference_counts_absent_classes_as_zero():
    # 4 classes over a split of two 2x2 images; classes 2 and 3 occur nowhere; 255 is never scored
    target = torch.tensor([[[0, 0], [1, 1]], [[0, 255], [1, 0]]])
    pred = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [1, 0]]])
    task = make_task("semseg", 4)
    ref, ours = make_meter(task), make_meter(task, "present_classes")
    for m in (ref, ours):
        m.update(one_hot_logits(pred[:1], 4), target[:1])
        m.update(one_hot_logits(pred[1:], 4), target[1:])
    # class 0: tp 3, fn 1 (0 -> 1) -> 3/4 ; class 1: tp 3, fp 1 -> 3/4 ; classes 2, 3: 0 / max(0, 1e-8) = 0
    assert ref.compute()["miou"] == pytest.approx((0.75 + 0.75 + 0 + 0) / 4)
    assert ours.compute()["miou"] == pytest.approx(0.75)  # the former variant averages the 2 present classes
    assert ref.definition == "reference" and ours.definition == "present_classes"


def test_human_parts_reference_skips_images_without_a_person():
    task = make_task("human_parts")  # 7 classes
    target = torch.tensor([[[0, 1]], [[0, 0]], [[255, 255]], [[0, 255]]])
    pred = torch.tensor([[[0, 1]], [[2, 0]], [[3, 3]], [[4, 4]]])
    ref, ours = make_meter(task), make_meter(task, "present_classes")
    for m in (ref, ours):
        m.update(one_hot_logits(pred, 7), target)
    # reference: image 2 (all background) and image 3 (all 255) are skipped; image 4 (0 and 255) is not.
    #   class 0: tp 1 (image 1), fn 1 (image 4: 0 -> 4) -> 1/2 ; class 1: 1 ; class 4: fp 1 -> 0 ; others 0
    assert ref.compute()["miou"] == pytest.approx((0.5 + 1) / 7)
    # former variant: nothing skipped, present classes only: class 0 tp 2, fn 2 -> 1/2 ; 1 -> 1 ; 2 -> 0 ; 4 -> 0
    assert ours.compute()["miou"] == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    semseg = make_meter(make_task("semseg", 7))  # the semseg reference skips no image
    semseg.update(one_hot_logits(pred, 7), target)
    assert semseg.compute()["miou"] == pytest.approx((2 / 4 + 1) / 7)  # class 0: tp 2, fp 0, fn 2


def saliency_split():
    # two images of 4 pixels: probabilities chosen away from the 8-bit / threshold boundaries
    probs = [torch.tensor([[[0.95, 0.30, 0.62, 0.05]]]), torch.tensor([[[0.62, 0.05, 0.05, 0.05]]])]
    labels = [torch.tensor([[[1, 1, 0, 0]]]), torch.tensor([[[1, 0, 0, 0]]])]
    return [logit(p)[:, None] for p in probs], labels


def test_saliency_reference_maxf_is_per_image_f1_over_15_thresholds():
    logits, labels = saliency_split()
    ref, ours = make_meter(make_task("saliency")), make_meter(make_task("saliency"), "pooled")
    for m in (ref, ours):
        for x, y in zip(logits, labels):
            m.update(x, y)
    # the 8-bit PNG turns 0.95, 0.30, 0.62, 0.05 into 242, 76, 158, 12 / 255 = 0.949, 0.298, 0.620, 0.047;
    # thresholds 0.20, 0.25: image 1 P 2/3 R 1, image 2 P 1 R 1 -> mean P 5/6, R 1 -> F1 = 10/11
    # thresholds 0.30..0.60: image 1 P 1/2 R 1/2, image 2 P 1 R 1 -> F1 0.75
    # thresholds 0.65..0.90: image 1 P 1 R 1/2, image 2 nothing predicted: P 0 R 0 -> P 1/2 R 1/4 -> F1 1/3
    r = ref.compute()
    assert r["maxf"] == pytest.approx(10 / 11, abs=1e-9)
    # Jaccard: (2/3 + 1) / 2 at 0.20 / 0.25, (1/3 + 1) / 2 at 0.30..0.60, (1/2 + 0) / 2 above: max 5/6
    assert r["miou"] == pytest.approx(5 / 6, abs=1e-9)
    # the former variant pools the 8 pixels (3 positives) at 99 thresholds, F-beta^2 0.3: best in (0.05, 0.30]
    # with tp 3, fp 1 -> P 3/4, R 1 -> 1.3 * 0.75 / (0.3 * 0.75 + 1)
    p = ours.compute()
    assert p["maxf"] == pytest.approx(1.3 * 0.75 / (0.3 * 0.75 + 1))
    assert r["maxf"] != pytest.approx(p["maxf"], abs=0.05)


def test_saliency_reference_voids_255_and_skips_unlabelled_images():
    m = make_meter(make_task("saliency"))
    m.update(logit([[[[0.95, 0.05], [0.95, 0.05]]]]), torch.tensor([[[1, 0], [0, 255]]]))
    m.update(logit([[[[0.95, 0.95]]]]), torch.tensor([[[255, 255]]]))  # no labelled pixel: not an image of the split
    # one image: tp 1, fp 1 (pixel (1, 0)), the 255 pixel void -> P 1/2, R 1 -> F1 2/3 ; Jaccard 1/2
    r = m.compute()
    assert r["maxf"] == pytest.approx(2 / 3, abs=1e-9) and r["miou"] == pytest.approx(0.5)
    empty = make_meter(make_task("saliency"))  # an image without foreground, nothing predicted: Jaccard 1, P = R = 0
    empty.update(logit([[[[0.05, 0.05]]]]), torch.tensor([[[0, 0]]]))
    assert empty.compute() == {"maxf": 0.0, "miou": 1.0}


def normals_pair(degrees):
    """Predictions at `degrees` from the label (0, 0, 1), in the x-z plane, as (1, 3, 1, n)."""
    rad = torch.deg2rad(torch.tensor(degrees, dtype=torch.float64))
    pred = torch.stack([torch.sin(rad), torch.zeros_like(rad), torch.cos(rad)])[None, :, None]
    label = torch.zeros_like(pred)
    label[:, 2] = 1
    return pred.float(), label.float()


def test_normals_statistics_and_valid_pixels():
    pred, label = normals_pair([0.0, 90.0, 45.0, 10.0])
    m = make_meter(make_task("normals"), "float")
    m.update(pred, label)
    r = m.compute()
    assert r["mean_angle"] == pytest.approx(36.25, abs=1e-4)
    assert r["median_angle"] == pytest.approx(27.5, abs=0.01)  # (10 + 45) / 2, from the 0.01-degree histogram
    assert r["rmse_angle"] == pytest.approx(math.sqrt((0 + 8100 + 2025 + 100) / 4), abs=1e-3)
    assert (r["within_11.25"], r["within_22.5"], r["within_30"]) == (50.0, 50.0, 50.0)
    # only an all-zero label vector is invalid: a PNG pixel (0, 0, 0) decodes to (-1, -1, -1) and is scored
    x = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
    y = torch.tensor([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
    ref = make_meter(make_task("normals"))
    ref.update(x, y)
    assert int(ref.n) == 1 and ref.compute()["mean_angle"] == pytest.approx(0.0, abs=1e-3)


def test_normals_reference_scores_the_8bit_prediction():
    pred, label = normals_pair([0.0])
    m = make_meter(make_task("normals"))
    m.update(pred, label)
    # (0, 0, 1) -> PNG (127, 127, 255) -> (-1/255, -1/255, 1): atan(sqrt(2) / 255) = 0.3177 degrees
    assert m.compute()["mean_angle"] == pytest.approx(math.degrees(math.atan(math.sqrt(2) / 255)), abs=1e-6)


def test_depth_reference_and_unclamped():
    out = torch.tensor([[[[1.0, -1.0, 5.0]]]])
    label = torch.tensor([[[[2.0, 1.0, 0.0]]]])  # the last pixel has no depth
    ref, ours = make_meter(make_task("depth")), make_meter(make_task("depth"), "unclamped")
    for m in (ref, ours):
        m.update(out, label)
    # reference: -1 clamped to 1e-9 -> errors 1, 1 - 1e-9 ; log errors log 2, log(1 / 1e-9)
    r = ref.compute()
    assert r["rmse"] == pytest.approx(math.sqrt((1 + 1) / 2), abs=1e-8)
    assert r["log_rmse"] == pytest.approx(math.sqrt((math.log(2) ** 2 + math.log(1e9) ** 2) / 2))
    assert ours.compute() == {"rmse": pytest.approx(math.sqrt((1 + 4) / 2))}


@pytest.mark.parametrize("task,definition", [(t, d) for t in ("semseg", "human_parts", "saliency", "normals", "depth")
                                             for d in DEFINITIONS[make_task(t).kind]])
def test_states_are_sums_so_shards_add_up(task, definition):
    """Two ranks' states summed (what torchmetrics does under DDP) give the one-process result."""
    torch.manual_seed(0)
    t = make_task(task, 5 if task in ("semseg", "human_parts") else None)
    out = torch.randn(6, t.channels, 4, 4)
    if t.kind == "classes":
        label = torch.randint(0, 5, (6, 4, 4))
        label[1] = 0  # a part-less image (the human-parts reference skips it)
        label[2, :2] = 255
    elif t.kind == "binary":
        label = torch.randint(0, 2, (6, 4, 4))
        label[3] = 255
    elif t.kind == "normals":
        label = torch.nn.functional.normalize(torch.randn(6, 3, 4, 4), dim=1)
        label[:, :, 0] = 0
    else:
        label = torch.rand(6, 1, 4, 4) * 5
        label[:, :, 0] = 0
        out = out * 3
    whole, a, b = (make_meter(t, definition) for _ in range(3))
    whole.update(out, label)
    a.update(out[:2], label[:2])
    a.update(out[2:3], label[2:3])
    b.update(out[3:], label[3:])
    assert all(fx is dim_zero_sum for fx in whole._reductions.values())
    a.merge_state(b)
    got, want = a.compute(), whole.compute()
    assert got.keys() == want.keys() and all(math.isclose(got[k], want[k], rel_tol=1e-9, abs_tol=1e-12) for k in got)


def test_resolve_definitions():
    tasks = {t: make_task(t) for t in ("semseg", "saliency", "edges", "normals")}
    assert resolve_definitions(tasks) == {"semseg": "reference", "saliency": "reference", "edges": "pooled",
                                          "normals": "reference"}
    assert resolve_definitions(tasks, "previous") == {"semseg": "present_classes", "saliency": "pooled",
                                                      "edges": "pooled", "normals": "float"}
    assert resolve_definitions(tasks, {"saliency": "pooled"})["saliency"] == "pooled"
    with pytest.raises(ValueError, match="'pooled' is not a definition of semseg"):
        resolve_definitions(tasks, "pooled")
    with pytest.raises(ValueError, match="edges has no reference metric here"):
        resolve_definitions(tasks, {"edges": "reference"})
    with pytest.raises(ValueError, match=r"tasks \['depth'\] are not in this run"):
        resolve_definitions(tasks, {"depth": "reference"})
    assert recorded_definitions({"normals": "reference"}, normals_mask=False) == {"normals": "reference_unmasked"}
    assert recorded_definitions({"normals": "reference"}, normals_mask=True) == {"normals": "reference"}
    # metrics.json rows written before definitions were recorded used the previous variants
    assert run_definitions({"tasks": ["semseg", "normals"]}) == {"semseg": "present_classes", "normals": "float"}


def test_delta_m_by_hand():
    res = {"semseg": 0.66, "normals": 13.5}
    single = {"semseg": 0.60, "normals": 15.0}
    # (+10% + 10%) / 2: normals are lower-is-better
    assert delta_m(res, single, {"semseg": False, "normals": True}) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no single-task baseline for task"):
        delta_m({"depth": 1.0}, single, {"depth": True})
    with pytest.raises(ValueError, match="baseline of \\['semseg'\\] is 0"):
        delta_m({"semseg": 0.5}, {"semseg": 0.0}, {"semseg": False})
