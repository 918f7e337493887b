"""The core under composition, dtype, device, threads and long runs (issue 7).

Each test here failed on the code before the fix it names and asserts values.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shared import backbones, fs, peft
from shared.backbones import UnsupportedMethod, anatomy

# The exit Linear of each family's MHSA sublayer: where LoRA and an output hook meet.
EXIT = {"vit": "proj", "ast": "o_proj", "llama": "o_proj", "bert": "attention.output.dense"}


def _train(tiny, model, x, steps: int = 3, seed: int = 7):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    w = None
    model.train()
    for _ in range(steps):
        out = tiny.tokens(model, x)
        w = torch.randn(out.shape, generator=g) if w is None else w
        opt.zero_grad()
        (out * w).sum().backward()
        opt.step()
    model.eval()


def _hooks(model):
    return [(n, fn) for n, m in model.named_modules()
            for fn in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())]


# ---------------------------------------------------------------------------------------------
# 1. merge keeps outputs for every mix and order of LoRA and a hook method on the same exit
# ---------------------------------------------------------------------------------------------
HOOKS = {
    "film": (lambda: peft.FiLM(placement="mhsa"), True),
    "linear_adapter": (lambda: peft.Adapter(placement="mhsa", mode="sequential", bottleneck=4,
                                            activation="identity", scale=0.7), True),
    "parallel_adapter": (lambda: peft.Adapter(placement="mhsa", mode="parallel", bottleneck=4), False),
    "gelu_adapter": (lambda: peft.Adapter(placement="mhsa", mode="sequential", bottleneck=4), False),
}
ORDERS = ("one_call", "hook_then_lora", "lora_then_hook")


@pytest.mark.parametrize("anat", list(EXIT))
@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("order", ORDERS)
def test_merge_keeps_outputs_for_every_mix_and_order(tiny, anat, hook, order):
    make_hook, mergeable = HOOKS[hook]
    lora = peft.LoRA(r=4, alpha=8, targets=(EXIT[anat],))
    model, x = tiny.backbone(anat), tiny.input(anat)
    if order == "one_call":
        peft.attach(model, [make_hook(), lora])
    elif order == "hook_then_lora":
        peft.attach(model, [make_hook()])
        peft.attach(model, [lora])
    else:
        peft.attach(model, [lora])
        peft.attach(model, [make_hook()])
    _train(tiny, model, x)
    before = tiny.forward(model, x)
    report = peft.merge(model)
    torch.testing.assert_close(tiny.forward(model, x), before, atol=2e-5, rtol=0)
    if mergeable:
        assert set(report.values()) == {"merged"}, report
        assert not _hooks(model)
    else:
        assert report[make_hook().name] != "merged"
    # a second merge changes nothing
    peft.merge(model)
    torch.testing.assert_close(tiny.forward(model, x), before, atol=2e-5, rtol=0)


def test_inner_nonlinear_hook_blocks_the_lora_merge_with_a_reason(tiny):
    """A GELU adapter on the plain `proj`, then LoRA wrapping it: folding LoRA into `proj` would
    put its delta under the adapter, so LoRA stays attached and says why."""
    model, x = tiny.backbone("ast"), tiny.input("ast")
    peft.attach(model, [peft.Adapter(placement="mhsa", mode="sequential", bottleneck=4)])
    peft.attach(model, [peft.LoRA(r=4, alpha=8, targets=("o_proj",))])
    _train(tiny, model, x)
    report = peft.merge(model)
    assert "base layer" in report["lora"] and report["adapter"] != "merged"


# ---------------------------------------------------------------------------------------------
# 2. AdaLoRA keeps its budget after total_step; total_step comes from the run
# ---------------------------------------------------------------------------------------------
def _kept(model) -> int:
    return sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)


def _adalora_steps(model, steps, x, w):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kept = []
    for step in range(steps):
        loss = (anatomy(model).forward_tokens(x).x * w).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        peft.step(model, step)
        kept.append(_kept(model))
    return kept


def test_adalora_budget_holds_after_total_step():
    torch.manual_seed(0)
    model = peft.attach(backbones.create("tiny-vit"), [peft.AdaLoRA(init_r=6, target_r=2, targets=("qkv",),
                                                                    total_step=8, tinit=1, tfinal=2)])
    kept = _adalora_steps(model, 20, torch.randn(4, 3, 32, 32), torch.randn(4, 17, 32))
    assert kept[0] == 12  # 2 layers x init_r 6
    assert kept[6:] == [4] * 14  # budget 2 x 2 layers reached at total_step - tfinal and kept after it


def test_adalora_total_step_from_the_run():
    torch.manual_seed(0)
    model = peft.attach(backbones.create("tiny-vit"), [peft.AdaLoRA(init_r=6, target_r=2, targets=("qkv",),
                                                                    tinit=1, tfinal=2)])
    with pytest.raises(RuntimeError, match="total_step"):
        peft.step(model, 0)
    with pytest.raises(ValueError, match="tinit"):
        peft.start(model, 3)  # 1 + 2 >= 3: no step left for the allocation
    peft.start(model, 10)
    assert model.peft_tuners["adalora"].peft_config["adalora"].total_step == 10
    kept = _adalora_steps(model, 14, torch.randn(4, 3, 32, 32), torch.randn(4, 17, 32))
    assert kept[8:] == [4] * 6


def test_lightning_module_starts_adalora_with_the_estimated_steps():
    from shared.module import ClassificationModule

    m = ClassificationModule(backbone="tiny-vit", num_classes=2,
                             methods=[{"name": "adalora", "init_r": 4, "target_r": 2, "targets": ["qkv"]}])

    class _Trainer:
        estimated_stepping_batches = 37

    m._trainer = _Trainer()
    m.on_train_start()
    backbone = m.model.backbone
    assert backbone.peft_tuners["adalora"].peft_config["adalora"].total_step == 37


# ---------------------------------------------------------------------------------------------
# 3. concurrent forwards on one model give exactly the single-thread outputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anat", ["vit", "ast"])
def test_eight_threads_give_single_thread_outputs(tiny, anat):
    model = tiny.backbone(anat)
    peft.attach(model, [peft.Adapter(placement="both", mode="parallel", bottleneck=8),
                        peft.Adapter(kind="conformer", placement="ffn", mode="parallel", bottleneck=4, kernel_size=3),
                        peft.Prefix(n_tokens=3)])
    _train(tiny, model, tiny.input(anat))
    g = torch.Generator().manual_seed(3)
    shape = tiny.input(anat).shape[1:]
    inputs = [torch.randn(1 + i % 3, *shape, generator=g) for i in range(8)]  # different batch sizes
    want = [tiny.forward(model, x) for x in inputs]
    got: dict[int, list] = {i: [] for i in range(8)}

    def work(i):
        for _ in range(6):
            with torch.no_grad():
                got[i].append(tiny.tokens(model, inputs[i]))

    tiny.threads(work, 8)
    for i in range(8):
        for out in got[i]:
            assert torch.equal(out, want[i])


# ---------------------------------------------------------------------------------------------
# 4. new tensors take the backbone's dtype and device
# ---------------------------------------------------------------------------------------------
DTYPE_METHODS = [
    peft.LoRA(r=4, targets=("qkv",)), peft.DoRA(r=4, targets=("qkv",)), peft.QKVLoRA(r=4), peft.IA3(),
    peft.LoHa(r=4), peft.LoKr(r=4), peft.VeRA(r=4), peft.AdaLoRA(init_r=4, target_r=2, total_step=10),
    peft.Adapter(placement="both", mode="parallel", bottleneck=8),
    peft.Adapter(kind="conformer", placement="ffn", mode="sequential", bottleneck=8, kernel_size=3),
    peft.Adapter(kind="convpass", placement="mhsa", bottleneck=8), peft.Compacter(bottleneck=8),
    peft.FiLM(placement="both"), peft.Prompt(n_tokens=2), peft.Prefix(n_tokens=2), peft.BitFit(),
    peft.NormTuning(),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", DTYPE_METHODS, ids=lambda m: m.name + getattr(m, "kind", ""))
def test_methods_take_the_backbone_dtype(tiny, dtype, method):
    model = tiny.backbone("vit").to(dtype)
    peft.attach(model, [method])
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {dtype}
    x = tiny.input("vit").to(dtype)
    model.train()
    out = tiny.tokens(model, x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in trained)


@pytest.mark.parametrize("method", DTYPE_METHODS, ids=lambda m: m.name + getattr(m, "kind", ""))
def test_methods_join_the_backbone_device(tiny, method):
    """On a model whose weights live on the meta device, every tensor a method creates lives there
    too (the same rule puts them on the GPU with a CUDA backbone)."""
    model = peft.weightless_copy(tiny.backbone("vit"))
    peft.attach(model, [method], compute_fingerprint=False)
    assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"meta"}


@pytest.mark.parametrize("hook", ["film", "linear_adapter"])
def test_merge_in_bf16(tiny, hook):
    model, x = tiny.backbone("vit").to(torch.bfloat16), tiny.input("vit").to(torch.bfloat16)
    peft.attach(model, [HOOKS[hook][0]()])
    _train(tiny, model, x)
    before = tiny.forward(model, x)
    assert set(peft.merge(model).values()) == {"merged"}
    torch.testing.assert_close(tiny.forward(model, x), before, atol=0.05, rtol=0.02)


# ---------------------------------------------------------------------------------------------
# 5. a refused attach leaves the backbone untouched; a retry records the right fingerprint
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anat,methods,error", [
    ("swin", lambda: [peft.LoRA(r=4, targets=("qkv",)), peft.Prompt(n_tokens=2)], UnsupportedMethod),
    ("vit", lambda: [peft.LoRA(r=4, targets=("qkv",)), peft.Adapter(blocks=(0, 5))], ValueError),
    ("vit", lambda: [peft.BitFit(), peft.Prefix(n_tokens=2), peft.Prefix(n_tokens=2)], ValueError),
])
def test_refused_attach_leaves_the_backbone_untouched(tiny, anat, methods, error):
    model = tiny.backbone(anat)
    fp = peft.fingerprint(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    structure = [(n, type(m).__name__) for n, m in model.named_modules()]
    with pytest.raises(error):
        peft.attach(model, methods())
    assert getattr(model, "peft_state", None) is None
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == structure
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not _hooks(model) and not any("forward" in m.__dict__ for m in model.modules())
    peft.attach(model, [peft.LoRA(r=4, targets=("qkv",))])
    assert model.peft_state.fingerprint == fp


# ---------------------------------------------------------------------------------------------
# 6. LayerScale: an adapter's delta joins after the per-sublayer scale
# ---------------------------------------------------------------------------------------------
def _layerscale_vit():
    return backbones.create("tiny-vit", depth=1, init_values=1e-2).eval()


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_adapter_delta_is_not_scaled_by_layerscale(mode):
    pristine = _layerscale_vit()
    model = peft.attach(copy.deepcopy(pristine), [peft.Adapter(placement="both", mode=mode, bottleneck=4,
                                                               activation="identity")])
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    blk, ref = model.blocks[0], pristine.blocks[0]
    x = torch.randn(2, 17, 32)

    def adapter(name, h):
        a = getattr(blk, name)
        return a.up(a.down(h))

    with torch.no_grad():  # the block by hand: x + ls1(attn(n1 x)) + delta, then the same for the MLP
        h = ref.norm1(x)
        y = ref.ls1(ref.attn(h))
        x1 = x + y + adapter("peft_adapter_mhsa", h if mode == "parallel" else y)
        h = ref.norm2(x1)
        y = ref.ls2(ref.mlp(h))
        want = x1 + y + adapter("peft_adapter_ffn", h if mode == "parallel" else y)
        got = blk(x)
    assert float(ref.ls1.gamma.abs().max()) == pytest.approx(1e-2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hook", ["film", "linear_adapter"])
def test_merge_through_layerscale(tiny, hook):
    model = _layerscale_vit()
    x = tiny.input("vit")
    peft.attach(model, [HOOKS[hook][0](), peft.LoRA(r=4, alpha=8, targets=("proj",))])
    _train(tiny, model, x)
    before = tiny.forward(model, x)
    assert set(peft.merge(model).values()) == {"merged"}
    torch.testing.assert_close(tiny.forward(model, x), before, atol=2e-5, rtol=0)
    assert torch.equal(model.blocks[0].ls1.gamma, torch.ones(32))  # absorbed into attn.proj


# ---------------------------------------------------------------------------------------------
# 9. smaller ones
# ---------------------------------------------------------------------------------------------
def test_duplicate_block_indices_are_refused(tiny):
    with pytest.raises(ValueError, match="same block"):
        peft.attach(tiny.backbone("vit"), [peft.Adapter(blocks=(1, -1))])


def test_prefix_on_ast_applies_attention_dropout():
    model = backbones.create("tiny-ast", attention_probs_dropout_prob=0.5)
    peft.attach(model, [peft.Prefix(n_tokens=3)])
    x = torch.randn(2, 64, 32)
    model.train()
    with torch.no_grad():
        a, b = (anatomy(model).forward_tokens(x).x for _ in range(2))
    assert (a - b).abs().max() > 1e-3  # dropout draws differ between the two forwards
    model.eval()
    with torch.no_grad():
        assert torch.equal(anatomy(model).forward_tokens(x).x, anatomy(model).forward_tokens(x).x)


def test_ia3_feedforward_outside_targets_names_the_cause(tiny):
    with pytest.raises(ValueError, match=r"feedforward \['fc1'\] must also be listed in targets"):
        peft.IA3(targets=("qkv", "fc2"), feedforward=("fc1",))


def test_fused_qkv_lora_adapts_only_q_and_v(tiny):
    model, x = tiny.backbone("vit"), torch.randn(3, 5, 32)
    peft.attach(model, [peft.QKVLoRA(r=2, alpha=4, parts=("q", "v"))])
    layer = model.blocks[0].attn.peft_lora_qkv_qkv
    with torch.no_grad():
        layer.lora_b.normal_()
        qkv = model.blocks[0].attn.qkv
        base = x @ qkv.weight.T + qkv.bias
        out = qkv(x)
    a, b = layer.lora_a.detach(), layer.lora_b.detach()
    q = base[..., :32] + 2.0 * x @ a[0].T @ b[0].T
    v = base[..., 64:] + 2.0 * x @ a[1].T @ b[1].T
    torch.testing.assert_close(out, torch.cat([q, base[..., 32:64], v], -1), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[..., 32:64], base[..., 32:64])  # keys untouched


def test_lora_bias_lora_only_trains_the_adapted_biases(tiny):
    model = peft.attach(tiny.backbone("vit"), [peft.LoRA(r=2, targets=("qkv",), bias="lora_only")])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.0.attn.qkv.base_layer.bias", "blocks.1.attn.qkv.base_layer.bias"} <= trained
    assert not any("proj.bias" in n or "fc1.bias" in n for n in trained)


def test_replace_dir_never_leaves_the_destination_missing(tmp_path, monkeypatch):
    import os

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "b").write_text("new")
    seen, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(a, b):
        real_replace(a, b)
        seen.append(dest.exists())

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    fs.replace_dir(new, dest)
    assert all(seen), "the destination was missing between two renames"
    assert (dest / "b").read_text() == "new" and not (dest / "a").exists() and not new.exists()
    assert len(synced) >= 2  # the file and its folder reached the disk before the swap
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


# ---------------------------------------------------------------------------------------------
# 10. activation recomputation works with every method and gives the same gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anat", ["vit", "ast", "llama"])
def test_recompute_gives_identical_loss_and_gradients(tiny, anat):
    methods = [peft.LoRA(r=4, alpha=8, targets=("qkv",) if anat == "vit" else ("q_proj",)),
               peft.Adapter(placement="both", mode="parallel", bottleneck=8), peft.FiLM(placement="ffn")]
    if anat != "llama":
        methods += [peft.Prefix(n_tokens=2)]
    a = peft.attach(tiny.backbone(anat), methods)
    _train(tiny, a, tiny.input(anat), steps=1)  # non-trivial adapter weights
    b = copy.deepcopy(a)
    assert peft.recompute(b) == 2 and peft.recompute(b) == 0
    x = tiny.input(anat)
    grads = []
    for m in (a, b):
        m.train()
        m.zero_grad(set_to_none=True)
        loss = tiny.tokens(m, x).pow(2).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)
    assert peft.recompute(b, enabled=False) == 2 and "forward" not in b.get_submodule(
        "layers.0" if anat != "vit" else "blocks.0").__dict__


def test_recompute_on_a_padded_causal_lm_batch_keeps_the_kv_cache_out():
    """Recomputing a Llama block in the backward must not append to a KV cache a second time (the
    logits path of a causal LM, padded batch): same loss and gradients as without recompute."""
    from shared import backbones

    torch.manual_seed(0)
    a = backbones.create("tiny-llama-lm")
    peft.attach(a, [peft.LoRA(r=4, alpha=8, targets=("q_proj", "v_proj"))], backbone_id="tiny-llama-lm")
    for n, p in a.named_parameters():
        if "lora" in n:
            torch.nn.init.normal_(p, std=0.02)
    b = copy.deepcopy(a)
    assert a.config.use_cache and peft.recompute(b) > 0 and b.config.use_cache is False
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    grads, losses = [], []
    for m in (a, b):
        m.train()
        loss = m(input_ids=ids, attention_mask=mask).logits.float().pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_classification_module_recompute_flag():
    from shared.module import ClassificationModule

    m = ClassificationModule(backbone="tiny-vit", num_classes=2, methods=[{"name": "lora", "targets": ["qkv"]}],
                             recompute=True)
    assert all("forward" in b.__dict__ for b in m.model.backbone.blocks)
    x = torch.randn(2, 3, 32, 32)
    m.train()
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_attached_modules_follow_the_model_mode(tiny):
    """A bundle loaded into an eval-mode backbone must not leave its new BatchNorm in train mode."""
    model = tiny.backbone("vit").eval()
    peft.attach(model, [peft.Adapter(kind="conformer", bottleneck=4, kernel_size=3)])
    assert not any(m.training for m in model.modules())


def test_prefix_vpt_uniform_init_follows_petl_ast():
    """PETL-AST's prefix keys / values: U(-a, a), a = sqrt(6 / (3 * 16 * 16 + D)); ours default N(0, 0.02)."""
    model = backbones.create("tiny-ast", patch_size=16, frequency_stride=16, time_stride=16, max_length=64,
                             num_mel_bins=32)
    peft.attach(model, [peft.Prefix(n_tokens=50, init="vpt_uniform")])
    kv = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if p.requires_grad])
    bound = (6.0 / (3 * 16 * 16 + 32)) ** 0.5
    assert kv.abs().max() <= bound and kv.abs().max() > 0.95 * bound
    assert kv.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)  # uniform's std
    with pytest.raises(ValueError, match="init"):
        peft.Prefix(init="xavier")


@pytest.mark.parametrize("task", [1, (0, 1)])
def test_recompute_keeps_the_hypernetwork_task(tiny, task):
    """The recomputation runs in the backward, outside `use_task`: it must re-enter the same task."""
    a = peft.attach(tiny.backbone("swin"), [peft.PolyhistorLite(tasks=2, placement="ffn", mode="parallel",
                                                                bottleneck=8)])
    with torch.no_grad():  # non-zero up projections: the task then shapes the output
        for n, p in a.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    b = copy.deepcopy(a)
    peft.recompute(b)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for m in (a, b):
        m.train()
        with peft.use_task(task):
            loss = tiny.tokens(m, x).pow(2).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)
