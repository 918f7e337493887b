"""The multi-task dense model: decoders, per-task backbone runs, baselines' trainable counts, new tasks."""
from __future__ import annotations

import pytest
import torch

from shared import peft
from vision.model import MLPDecoder, add_task, build_model, trainable_counts
from vision.module import task_loss
from vision.tasks import IGNORE, make_task

KW = dict(img_size=32, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2)
DIMS = [8, 16, 32, 64]
TASKS = {t: make_task(t) for t in ("semseg", "saliency", "normals")}


def model_with(methods, tasks=TASKS, width=8):
    torch.manual_seed(0)
    return build_model("tiny-swin", tasks, methods, KW, width)


def test_decoder_count_and_shapes():
    dec = MLPDecoder(DIMS, 21, 8)
    assert sum(p.numel() for p in dec.parameters()) == MLPDecoder.count(DIMS, 21, 8) == \
        (8 * 8 + 8 + 16 * 8 + 8 + 32 * 8 + 8 + 64 * 8 + 8) + 4 * 8 * 8 + 2 * 8 + 8 * 21 + 21
    m = model_with([])
    out = m(torch.randn(2, 3, 32, 32))
    assert {t: tuple(o.shape) for t, o in out.items()} == {"semseg": (2, 21, 32, 32), "saliency": (2, 1, 32, 32),
                                                          "normals": (2, 3, 32, 32)}
    with pytest.raises(ValueError, match=r"no decoder for task\(s\) \['depth'\]"):
        m(torch.randn(1, 3, 32, 32), tasks=["depth"])


@pytest.mark.parametrize("methods,backbone_count", [
    ([], 0),
    ([{"name": "full"}], None),  # every backbone weight
    ([{"name": "bitfit"}], "bitfit"),
    ([{"name": "adapter", "bottleneck": 4}], sum(d * 4 + 4 + 4 * d + d for d in DIMS)),
    ([{"name": "polyhistor_lite", "bottleneck": 4, "rank": 2, "templates": 2, "embed_dim": 4, "proj_dim": 4}],
     3 * 4 + (8 * 4 + 4) + 4 * 4 + (4 * 2 * 8 * 2 + 2 * 8 * 2) + (4 * 2 * 4 + 2 * 4) + (4 * 4 + 4) + (4 * 4 * 2 + 4 * 2)
     + (4 * 2 * 2 * 8 + 2 * 2 * 8) + (4 * 2 * 8 + 2 * 8) + sum(2 * (d // 8) * 2 for d in DIMS)),
])
def test_trainable_counts_of_the_baselines(methods, backbone_count):
    m = model_with(methods)
    dec = sum(MLPDecoder.count(DIMS, t.channels, 8) for t in TASKS.values())
    bb_total = sum(p.numel() for p in m.backbone.parameters())
    if backbone_count is None:
        backbone_count = bb_total
    elif backbone_count == "bitfit":
        backbone_count = sum(mod.bias.numel() for mod in m.backbone.modules()
                             if isinstance(getattr(mod, "bias", None), torch.nn.Parameter)
                             and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)))
    c = trainable_counts(m)
    assert c == {"backbone": backbone_count, "decoders": dec, "trainable": backbone_count + dec,
                 "total": bb_total + dec}
    assert m.per_task == any(x["name"] == "polyhistor_lite" for x in methods)


def test_per_task_forward_uses_each_tasks_adapter_weights():
    m = model_with([{"name": "polyhistor", "bottleneck": 4, "rank": 2, "embed_dim": 4, "proj_dim": 4}])
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):  # move the zero-initialised up generators
        opt.zero_grad()
        sum(o.pow(2).mean() for o in m(x).values()).backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        out = m(x)
        for i, t in enumerate(m.names):
            with peft.use_task(i):
                feats = m.features(x)
            torch.testing.assert_close(out[t], m.decoders[t](feats, x.shape[-2:]))  # batched run == own run
        with peft.use_task(0):
            f0 = m.features(x)
        with peft.use_task(1):
            f1 = m.features(x)
        assert not torch.allclose(f0[-1], f1[-1])


def test_new_task_trains_only_its_embedding_and_decoder():
    m = model_with([{"name": "polyhistor_lite", "bottleneck": 4, "rank": 2, "templates": 2, "embed_dim": 4, "proj_dim": 4}])
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        before = m(x)
    add_task(m, "depth", make_task("depth"))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"backbone.peft_polyhistor_lite_shared.tasks.3"} | {f"decoders.depth.{n}" for n, _ in
                                                                          m.decoders["depth"].named_parameters()}
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 4 + MLPDecoder.count(DIMS, 1, 8)
    snapshot = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for _ in range(2):
        opt.zero_grad()
        out = m(x, tasks=["depth"])["depth"]
        task_loss(m.tasks["depth"], out, torch.rand(2, 1, 32, 32) + 0.1).backward()
        opt.step()
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, snapshot[n])}
    assert moved and moved <= trainable
    m.eval()
    with torch.no_grad():
        after = m(x, tasks=list(TASKS))
    for t in TASKS:  # old tasks unchanged
        torch.testing.assert_close(after[t], before[t], atol=0, rtol=0)
    with pytest.raises(ValueError, match="no hypernetwork method"):
        add_task(model_with([]), "depth", make_task("depth"))


def test_losses_ignore_unlabelled_pixels():
    sem = make_task("semseg", 3)
    out = torch.randn(1, 3, 2, 2, requires_grad=True)
    lab = torch.full((1, 2, 2), IGNORE)
    assert task_loss(sem, out, lab).item() == 0.0
    lab[0, 0, 0] = 2
    want = -torch.log_softmax(out[0, :, 0, 0], 0)[2]
    torch.testing.assert_close(task_loss(sem, out, lab), want)
    nrm = make_task("normals")
    pred = torch.tensor([[[[0.0, 5.0]], [[0.0, 0.0]], [[3.0, 0.0]]]])  # (1, 3, 1, 2): +z, +x
    lab = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]], [[1.0, 0.0]]]])   # +z, invalid
    assert task_loss(nrm, pred, lab).item() == pytest.approx(0.0)
