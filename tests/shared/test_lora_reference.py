"""Our LoRA / DoRA equal bare Hugging Face peft on the same weights, and the LoRA formula by hand."""
from __future__ import annotations

import copy

import peft as hf_peft
import pytest
import torch
from peft.tuners.lora import LoraLayer

from shared import peft

R, ALPHA = 4, 12.0
TARGETS = {"vit": ("qkv",), "ast": ("q_proj", "v_proj"), "llama": ("q_proj", "v_proj")}
CASES = [pytest.param(a, dora, id=f"{a}-{'dora' if dora else 'lora'}") for a in TARGETS for dora in (False, True)]


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _random_values(model, seed=0):
    """Random non-zero lora_A, lora_B (and DoRA magnitude) values for every LoRA layer, by name."""
    g = torch.Generator().manual_seed(seed)
    values = {}
    for name, layer in sorted(_lora_layers(model).items()):
        base = layer.get_base_layer()
        a = torch.randn(R, base.in_features, generator=g) * 0.3
        b = torch.randn(base.out_features, R, generator=g) * 0.3
        mag = base.weight.detach().norm(dim=1) * (1 + 0.5 * torch.rand(base.out_features, generator=g))
        values[name] = (a, b, mag)
    return values


def _set(model, key, values):
    layers = _lora_layers(model)
    assert layers.keys() == values.keys()
    with torch.no_grad():
        for name, (a, b, mag) in values.items():
            layers[name].lora_A[key].weight.copy_(a)
            layers[name].lora_B[key].weight.copy_(b)
            if layers[name].use_dora.get(key):
                layers[name].lora_magnitude_vector[key].weight.copy_(mag)
    return layers


@pytest.mark.parametrize("anat,dora", CASES)
def test_equals_bare_hf_peft(tiny, anat, dora):
    pristine = tiny.backbone(anat)
    x = tiny.input(anat)
    method = (peft.DoRA if dora else peft.LoRA)(r=R, alpha=ALPHA, targets=TARGETS[anat])
    ours = peft.attach(copy.deepcopy(pristine), [method])
    # The reference is peft's public entry point (PeftModel, which also decides what trains),
    # not the injection our code calls.
    wrapped = hf_peft.get_peft_model(
        copy.deepcopy(pristine),
        hf_peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS[anat]), use_dora=dora))
    ref = wrapped.get_base_model()
    values = _random_values(ours)
    layers = _set(ours, method.name, values)
    _set(ref, "default", values)
    assert len(layers) == 2 * len(TARGETS[anat])  # 2 blocks

    out, want = tiny.forward(ours, x), tiny.forward(ref, x)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert (out - tiny.forward(pristine, x)).abs().max() > 1e-3  # the update is not a no-op

    # the trainable tensors are exactly peft's adapter tensors
    hf_trainable = {n.removeprefix("base_model.model.").replace(".default", f".{method.name}")
                    for n, p in wrapped.named_parameters() if p.requires_grad}
    assert set(ours.peft_state.owner) == hf_trainable


@pytest.mark.parametrize("anat,dora", CASES)
def test_one_layer_matches_formula(tiny, anat, dora):
    method = (peft.DoRA if dora else peft.LoRA)(r=R, alpha=ALPHA, targets=TARGETS[anat])
    ours = peft.attach(tiny.backbone(anat), [method])
    layers = _set(ours, method.name, _random_values(ours))
    name, layer = sorted(layers.items())[-1]
    base = layer.get_base_layer()
    w = base.weight.detach()
    bias = base.bias.detach() if base.bias is not None else torch.zeros(w.shape[0])
    a, b = layer.lora_A[method.name].weight.detach(), layer.lora_B[method.name].weight.detach()
    s = ALPHA / R
    h = torch.randn(3, 5, base.in_features)
    if dora:  # W' = m (W + s B A) / ||W + s B A||_row
        w_adapted = w + s * b @ a
        m = layer.lora_magnitude_vector[method.name].weight.detach()
        want = h @ (m[:, None] * w_adapted / w_adapted.norm(dim=1, keepdim=True)).T + bias
    else:
        want = h @ w.T + bias + s * (h @ a.T @ b.T)
    layer.eval()
    with torch.no_grad():
        got = layer(h)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - (h @ w.T + bias)).abs().max() > 1e-3, name


def test_adalora_reallocates_ranks_to_the_target_budget():
    """peft's RankAllocator runs through shared.peft.step: after total_step - tfinal the number of
    kept singular values equals target_r per adapted layer on average (the budget), and the
    orthogonality penalty is a real, differentiable number."""
    import torch

    from shared import peft
    from shared.backbones import anatomy, create

    torch.manual_seed(0)
    model = peft.attach(create("tiny-vit", depth=2), [peft.AdaLoRA(init_r=6, target_r=2, targets=("qkv", "fc1"),
                                                                    total_step=12, tinit=2, tfinal=3)])
    x = torch.randn(4, 3, 32, 32)
    w = torch.randn(4, 17, 32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    reg = peft.regularization(model)
    assert reg is not None and reg.requires_grad and reg.item() > 0
    for step in range(12):
        loss = (anatomy(model).forward_tokens(x).x * w).sum() + peft.regularization(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        peft.step(model, step)
    e = [p for n, p in model.named_parameters() if "lora_E" in n]
    assert len(e) == 4  # qkv and fc1 in two blocks
    kept = sum(int((v != 0).sum()) for v in e)
    assert kept == 2 * len(e)  # target_r x layers; init was 6 x layers
