"""Hypernetwork adapters (HyperAdapter, Polyhistor, Polyhistor-Lite): generated weights equal the
formulas, the task is chosen per forward (thread-safe), new tasks add only an embedding, clear errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from shared import peft
from shared.backbones import anatomy
from shared.peft.hyper import active_task, kron_sum


def four_stage_swin(tiny):
    return tiny.backbone("swin", img_size=32, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2)


def _trained(model, steps=3, task_inputs=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        loss = 0
        for t in range(task_inputs or 1):
            with peft.use_task(t):
                loss = loss + anatomy(model).forward_tokens(x).x.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_kron_sum_is_sum_of_kronecker_products():
    k = torch.randn(3, 2)
    t = torch.randn(3, 4, 5)
    want0 = sum(torch.kron(k[i].reshape(2, 1), t[i]) for i in range(3))  # (8, 5)
    want1 = sum(torch.kron(k[i].reshape(1, 2), t[i]) for i in range(3))  # (4, 10)
    torch.testing.assert_close(kron_sum(k, t, 0), want0)
    torch.testing.assert_close(kron_sum(k, t, 1), want1)


@pytest.mark.parametrize("cls", ["hyper_adapter", "polyhistor", "polyhistor_lite"])
def test_generated_weights_equal_the_formula(tiny, cls):
    model = four_stage_swin(tiny)
    kw = dict(placement="ffn", bottleneck=4, embed_dim=5, proj_dim=6, tasks=2)
    if cls != "hyper_adapter":
        kw["rank"] = 3
    if cls == "polyhistor_lite":
        kw["templates"] = 2
    method = peft.METHODS[cls](**kw)
    peft.attach(model, [method])
    _trained(model, task_inputs=2)  # non-zero up generators
    sh = getattr(model, f"peft_{cls}_shared")
    blocks = anatomy(model).blocks()
    assert [b.mlp.fc2.out_features for b in blocks] == [8, 16, 32, 64]
    for blk in blocks:
        layer = getattr(blk, f"peft_{cls}_ffn")
        d = blk.mlp.fc2.out_features
        for t in (0, 1):
            s = torch.relu(sh.proj.weight @ torch.cat([sh.tasks[t], layer.layer]) + sh.proj.bias)
            g = sh.gens[layer.group]

            def gen(name):
                return g[name].weight @ s + g[name].bias

            if cls == "hyper_adapter":
                down = gen("down").reshape(d, 4) / math.sqrt(d)
                up = gen("up").reshape(4, d) / 2
                up_bias = gen("up_bias")
            elif cls == "polyhistor":
                down = gen("down_in").reshape(d, 3) @ gen("down_out").reshape(3, 4) / math.sqrt(d * 3)
                up = gen("up_in").reshape(4, 3) @ gen("up_out").reshape(3, d) / math.sqrt(4 * 3)
                up_bias = gen("up_bias")
            else:  # templates at C = 8, kernels (2, d / 8)
                k = d // 8
                assert layer.k_in.shape == layer.k_out.shape == (2, k)
                ti, to, tb = gen("down_in").reshape(2, 8, 3), gen("up_out").reshape(2, 3, 8), gen("up_bias").reshape(2, 8)
                din = sum(torch.kron(layer.k_in[i].reshape(k, 1), ti[i]) for i in range(2))
                uo = sum(torch.kron(layer.k_out[i].reshape(1, k), to[i]) for i in range(2))
                up_bias = sum(torch.kron(layer.k_out[i], tb[i]) for i in range(2))
                down = din @ gen("down_out").reshape(3, 4) / math.sqrt(d * 3)
                up = gen("up_in").reshape(4, 3) @ uo / math.sqrt(4 * 3)
            w = layer.weights(t)
            torch.testing.assert_close(w["down"], down)
            torch.testing.assert_close(w["up"], up)
            torch.testing.assert_close(w["down_bias"], gen("down_bias"))
            torch.testing.assert_close(w["up_bias"], up_bias)
            # and the hook adds exactly act(h W_down + b_down) W_up + b_up at the sublayer output
            h = torch.randn(3, d)
            with peft.use_task(t):
                got = layer.delta(h)
            torch.testing.assert_close(got, F.gelu(h @ down + gen("down_bias")) @ up + up_bias)


def test_lite_keeps_one_generator_set_polyhistor_one_per_stage(tiny):
    lite, poly = four_stage_swin(tiny), four_stage_swin(tiny)
    peft.attach(lite, [peft.PolyhistorLite(bottleneck=4, rank=2, templates=2, embed_dim=4, proj_dim=4, tasks=2)])
    peft.attach(poly, [peft.Polyhistor(bottleneck=4, rank=2, embed_dim=4, proj_dim=4, tasks=2)])
    assert list(lite.peft_polyhistor_lite_shared.gens) == ["g8_8_4"]
    assert list(poly.peft_polyhistor_shared.gens) == ["g8_8_4", "g16_16_4", "g32_32_4", "g64_64_4"]
    # Lite's kernels: (templates x d/C) for the d_in and d_out factors of each of the 4 layers
    assert [tuple(b.peft_polyhistor_lite_ffn.k_in.shape) for b in anatomy(lite).blocks()] == [(2, 1), (2, 2), (2, 4), (2, 8)]


def test_task_is_chosen_per_forward_and_threads_do_not_mix(tiny):
    model = _trained(peft.attach(four_stage_swin(tiny), [peft.PolyhistorLite(bottleneck=4, rank=2, templates=2,
                                                                           embed_dim=4, proj_dim=4, tasks=3)]),
                     task_inputs=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = []
        for t in range(3):
            with peft.use_task(t):
                ref.append(anatomy(model).forward_tokens(x).x)
    assert not torch.allclose(ref[0], ref[1])
    with pytest.raises(RuntimeError, match="3 tasks and none is selected"):
        anatomy(model).forward_tokens(x)
    with pytest.raises(ValueError, match="task 5 selected but the method has 3 tasks"), peft.use_task(5):
        anatomy(model).forward_tokens(x)
    with peft.use_task(0):  # nested: the inner task wins and the outer one comes back
        with peft.use_task(2):
            assert active_task() == 2
        assert active_task() == 0
    assert active_task() is None
    with torch.no_grad(), peft.use_task((2, 0, 1)):  # one forward, three task chunks
        both = anatomy(model).forward_tokens(torch.cat([x, x, x])).x
    for c, t in zip(both.chunk(3), (2, 0, 1)):
        torch.testing.assert_close(c, ref[t])
    with pytest.raises(ValueError, match="cannot be split into 3 task chunks"), peft.use_task((0, 1, 2)):
        anatomy(model).forward_tokens(x)
    with pytest.raises(ValueError, match="non-negative int indices"):
        peft.use_task((0, -1)).__enter__()
    outs = {}

    def work(i):
        t = i % 3
        for _ in range(3):
            with torch.no_grad(), peft.use_task(t):
                outs[i] = anatomy(model).forward_tokens(x).x
            assert torch.equal(outs[i], ref[t])

    tiny.threads(work, 8)


def test_add_task_adds_only_an_embedding_and_round_trips(tiny, tmp_path):
    pristine = four_stage_swin(tiny)
    model = peft.attach(copy.deepcopy(pristine), [peft.Polyhistor(bottleneck=4, rank=2, embed_dim=4, proj_dim=4, tasks=2)])
    before = peft.summary(model)["trainable"]
    assert peft.add_task(model) == 2
    assert peft.summary(model)["trainable"] == before + 4  # one embedding of embed_dim
    assert model.peft_state.methods[0][1].tasks == 3
    _trained(model, task_inputs=3)
    peft.save(model, tmp_path / "b")
    loaded = peft.load(copy.deepcopy(pristine), tmp_path / "b")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), peft.use_task(2):
        torch.testing.assert_close(anatomy(loaded.eval()).forward_tokens(x).x, anatomy(model.eval()).forward_tokens(x).x,
                                   atol=0, rtol=0)
    with pytest.raises(ValueError, match="no hypernetwork method"):
        peft.add_task(peft.attach(copy.deepcopy(pristine), [peft.BitFit()]))


def test_bad_configs_refuse_clearly(tiny):
    for bad, word in [(dict(tasks=0), "tasks must be a positive int"), (dict(rank=-1), "rank must be a positive int"),
                      (dict(templates=1.5), "templates must be a positive int"), (dict(activation="tanh"), "activation")]:
        with pytest.raises(ValueError, match=word):
            peft.PolyhistorLite(**bad)
    assert peft.from_dict({"name": "polyhistor_lite", "tasks": 4}).tasks == 4
    with pytest.raises(ValueError, match="not a multiple of the smallest adapted width"):  # 16 and 24 wide blocks
        model = tiny.backbone("swin", embed_dim=16, depths=(1, 1), num_heads=(2, 3))
        model.layers[1].blocks[0].mlp.fc2 = torch.nn.Linear(model.layers[1].blocks[0].mlp.fc2.in_features, 24)
        model.layers[1].blocks[0].mlp.fc1 = torch.nn.Linear(24, model.layers[1].blocks[0].mlp.fc1.out_features)
        peft.attach(model, [peft.PolyhistorLite(mode="parallel", bottleneck=2)])
