"""The method x backbone matrix: invariants every registered PEFT method keeps on every anatomy.

For each (method, anatomy): identity at init, only the method's tensors train, save -> load is
exact (bare backbone and Classifier), merge keeps outputs, and the trainable count equals a
closed form computed here from the config and the layer shapes. Methods that cannot apply to
an anatomy must refuse with a clear error, leaving the backbone untouched.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

from shared import peft
from shared.backbones import UnsupportedMethod
from shared.heads import LinearHead

LR, STEPS, D = 1e-2, 3, 32  # every tiny backbone ends at width 32


# ----------------------------------------------------------------------------------------------
# Anatomies, written out by hand (not read from shared.backbones) so the counts are independent
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    blocks: tuple[str, ...]
    mhsa: tuple[str, str, str | None]  # entry, exit, norm; relative to the block
    ffn: tuple[str, str, str | None]
    final_norm: str | None
    lora: tuple[str, ...]  # LoRA-family targets
    ia3: tuple[str, ...]
    ia3_ff: tuple[str, ...]
    vera: tuple[str, ...]  # same-shaped targets
    pool: str  # the head tested on this anatomy
    unsupported: dict[str, str] = field(default_factory=dict)  # variant -> word the error must contain


_TIMM = dict(mhsa=("attn.qkv", "attn.proj", "norm1"), ffn=("mlp.fc1", "mlp.fc2", "norm2"), final_norm="norm",
             lora=("qkv",), ia3=("qkv", "fc2"), ia3_ff=("fc2",), vera=("qkv",))
_NO_TOKENS_DECODER = {"prompt_deep": "causal", "prompt_shallow": "causal", "prefix": "causal", "bitfit": "bias",
                      "lora_qkv": "separate q/k/v"}
_NO_TOKENS_BERT = {"prompt_deep": "attention mask", "prompt_shallow": "attention mask", "prefix": "prefixtuningconfig",
                   "lora_qkv": "separate q/k/v"}
_NO_TOKENS_SWIN = {"prompt_deep": "window", "prompt_shallow": "window", "prefix": "window"}

SPECS = {
    "vit": Spec(blocks=("blocks.0", "blocks.1"), pool="cls", **_TIMM),
    "vit_reg": Spec(blocks=("blocks.0", "blocks.1"), pool="cls+patch_mean", **_TIMM),
    "ast": Spec(blocks=("layers.0", "layers.1"),
                mhsa=("attention.q_proj", "attention.o_proj", "layernorm_before"),
                ffn=("mlp.fc1", "mlp.fc2", "layernorm_after"), final_norm="layernorm",
                lora=("q_proj", "v_proj"), ia3=("q_proj", "v_proj", "fc2"), ia3_ff=("fc2",),
                vera=("q_proj", "v_proj"), pool="mean", unsupported={"lora_qkv": "separate q/k/v"}),
    "swin": Spec(blocks=("layers.0.blocks.0", "layers.1.blocks.0"), pool="patch_mean",
                 unsupported=_NO_TOKENS_SWIN, **_TIMM),
    "llama": Spec(blocks=("layers.0", "layers.1"),
                  mhsa=("self_attn.q_proj", "self_attn.o_proj", "input_layernorm"),
                  ffn=("mlp.gate_proj", "mlp.down_proj", "post_attention_layernorm"), final_norm="norm",
                  lora=("q_proj", "v_proj"), ia3=("q_proj", "v_proj", "down_proj"), ia3_ff=("down_proj",),
                  vera=("q_proj", "o_proj"), pool="last", unsupported=_NO_TOKENS_DECODER),
    "bert": Spec(blocks=("encoder.layer.0", "encoder.layer.1"),
                 mhsa=("attention.self.query", "attention.output.dense", "attention.output.LayerNorm"),
                 ffn=("intermediate.dense", "output.dense", "output.LayerNorm"), final_norm=None,
                 lora=("query", "value"), ia3=("query", "value", "output.dense"), ia3_ff=("output.dense",),
                 vera=("query", "value"), pool="cls", unsupported=_NO_TOKENS_BERT),
    "whisper": Spec(blocks=("layers.0", "layers.1"),
                    mhsa=("self_attn.q_proj", "self_attn.out_proj", "self_attn_layer_norm"),
                    ffn=("fc1", "fc2", "final_layer_norm"), final_norm="layer_norm",
                    lora=("q_proj", "v_proj"), ia3=("q_proj", "v_proj", "fc2"), ia3_ff=("fc2",),
                    vera=("q_proj", "v_proj"), pool="mean", unsupported={"lora_qkv": "separate q/k/v"}),
}


# ----------------------------------------------------------------------------------------------
# Method variants
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    make: Callable[[Spec], peft.Method]
    mergeable: bool
    identity: bool = True  # outputs unchanged at init


VARIANTS = {
    "lora": Variant(lambda s: peft.LoRA(r=4, alpha=8, targets=s.lora), True),
    "lora_bias": Variant(lambda s: peft.LoRA(r=4, alpha=8, targets=s.lora, bias="lora_only"), True),
    "lora_qkv": Variant(lambda s: peft.QKVLoRA(r=4, alpha=8, parts=("q", "v")), True),
    "dora": Variant(lambda s: peft.DoRA(r=4, alpha=8, targets=s.lora), True),
    "adalora": Variant(lambda s: peft.AdaLoRA(init_r=4, target_r=2, alpha=8, targets=s.lora), True),
    "ia3": Variant(lambda s: peft.IA3(targets=s.ia3, feedforward=s.ia3_ff), True),
    "loha": Variant(lambda s: peft.LoHa(r=4, alpha=8, targets=s.lora), True),
    "lokr": Variant(lambda s: peft.LoKr(r=4, alpha=8, targets=s.lora), True),
    "vera": Variant(lambda s: peft.VeRA(r=4, targets=s.vera), True),
    "adapter_bottleneck_ffn_parallel": Variant(
        lambda s: peft.Adapter(kind="bottleneck", placement="ffn", mode="parallel", bottleneck=8), False),
    "adapter_bottleneck_mhsa_sequential_linear": Variant(  # the mergeable adapter
        lambda s: peft.Adapter(kind="bottleneck", placement="mhsa", mode="sequential", bottleneck=8,
                               activation="identity", scale=0.5), True),
    "adapter_bottleneck_both_sequential_reduction_norms": Variant(
        lambda s: peft.Adapter(kind="bottleneck", placement="both", mode="sequential", reduction=5,
                               activation="relu", train_norms=True), False),
    "adapter_conformer_ffn_parallel": Variant(
        lambda s: peft.Adapter(kind="conformer", placement="ffn", mode="parallel", bottleneck=8, kernel_size=3), False),
    "adapter_conformer_both_sequential": Variant(
        lambda s: peft.Adapter(kind="conformer", placement="both", mode="sequential", reduction=4, kernel_size=5),
        False),
    "adapter_convpass_mhsa_parallel": Variant(
        lambda s: peft.Adapter(kind="convpass", placement="mhsa", mode="parallel", bottleneck=8), False),
    "adapter_convpass_both_sequential_norms": Variant(
        lambda s: peft.Adapter(kind="convpass", placement="both", mode="sequential", reduction=8, scale=0.5,
                               train_norms=True), False),
    "compacter_ffn_parallel": Variant(
        lambda s: peft.Compacter(placement="ffn", mode="parallel", bottleneck=8, phm_dim=4), False),
    "compacter_both_sequential_rounded": Variant(  # reduction 5 -> 6 (or 3) -> rounded to phm_dim multiples
        lambda s: peft.Compacter(placement="both", mode="sequential", reduction=5, phm_dim=4), False),
    "film": Variant(lambda s: peft.FiLM(placement="both"), True),
    "hyper_adapter_ffn_parallel": Variant(
        lambda s: peft.HyperAdapter(placement="ffn", mode="parallel", bottleneck=4, embed_dim=8, proj_dim=6), False),
    "polyhistor_both_sequential_reduction": Variant(
        lambda s: peft.Polyhistor(placement="both", mode="sequential", reduction=8, rank=2, embed_dim=8, proj_dim=6),
        False),
    "polyhistor_lite_ffn_parallel": Variant(
        lambda s: peft.PolyhistorLite(placement="ffn", mode="parallel", bottleneck=4, rank=2, templates=3,
                                      embed_dim=8, proj_dim=6), False),
    "prompt_deep": Variant(lambda s: peft.Prompt(n_tokens=3, deep=True), False, identity=False),
    "prompt_shallow": Variant(lambda s: peft.Prompt(n_tokens=3, deep=False), False, identity=False),
    "prefix": Variant(lambda s: peft.Prefix(n_tokens=3), False, identity=False),
    "bitfit": Variant(lambda s: peft.BitFit(), True),
    "norm_tuning": Variant(lambda s: peft.NormTuning(), True),
    "full": Variant(lambda s: peft.METHODS["full"](), True),  # the baseline: every backbone weight trains
}


def test_matrix_covers_every_registered_method():
    covered = {VARIANTS[v].make(SPECS["vit"]).name for v in VARIANTS}
    assert covered == set(peft.METHODS)
    adapters = [VARIANTS[v].make(SPECS["vit"]) for v in VARIANTS if v.startswith("adapter")]
    assert {a.kind for a in adapters} == {"bottleneck", "conformer", "convpass"}
    assert {a.placement for a in adapters} == {"mhsa", "ffn", "both"}
    assert {a.mode for a in adapters} == {"sequential", "parallel"}
    assert any(a.reduction is not None for a in adapters) and any(a.train_norms for a in adapters)


# The default tier runs every method on the timm ViT and, on every other anatomy, the variants whose
# code paths differ per family (peft-injected LoRA, our sublayer hooks at both placements, the
# mergeable adapter, token methods, BitFit, full); the whole matrix runs with `-m slow`.
CORE_VARIANTS = ("lora", "lora_qkv", "adapter_bottleneck_ffn_parallel", "adapter_bottleneck_mhsa_sequential_linear",
                 "adapter_conformer_ffn_parallel", "prompt_deep", "prefix", "bitfit", "full")


def _cell(a: str, v: str):
    default = a == "vit" or v in CORE_VARIANTS
    return pytest.param(a, v, id=f"{a}-{v}", marks=() if default else pytest.mark.slow)


APPLICABLE = [_cell(a, v) for a in SPECS for v in VARIANTS if v not in SPECS[a].unsupported]
UNSUPPORTED = [pytest.param(a, v, w, id=f"{a}-{v}") for a in SPECS for v, w in SPECS[a].unsupported.items()]


# ----------------------------------------------------------------------------------------------
# Closed-form trainable counts
# ----------------------------------------------------------------------------------------------
def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or \
        type(m).__name__.endswith("RMSNorm")


def _matched(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    """peft's rule: a target matches a module name exactly or as a dotted suffix."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]


def _sites(spec: Spec, model: nn.Module, placement: str):
    for blk in spec.blocks:
        for p in (("mhsa", "ffn") if placement == "both" else (placement,)):
            entry, exit_, norm = spec.mhsa if p == "mhsa" else spec.ffn
            get = model.get_submodule
            yield get(f"{blk}.{entry}"), get(f"{blk}.{exit_}"), get(f"{blk}.{norm}") if norm else None


def _lokr_count(m: nn.Linear, r: int) -> int:
    from peft.tuners.lokr.layer import factorization

    in_m, in_n = factorization(m.in_features, -1)
    out_l, out_k = factorization(m.out_features, -1)
    w1 = out_l * in_m  # decompose_both=False: w1 is always full
    w2 = out_k * in_n if r >= max(out_k, in_n) / 2 else r * (out_k + in_n)
    return w1 + w2


def expected_count(method: peft.Method, spec: Spec, model: nn.Module) -> int:
    """Trainable parameters `method` adds to the pristine `model` (closed form)."""
    if isinstance(method, peft.QKVLoRA):  # one (A, B) pair per chosen part of each fused qkv
        return sum(len(method.parts) * method.r * (m.in_features + m.out_features // 3)
                   for _, m in _matched(model, method.targets))
    if isinstance(method, (peft.LoRA, peft.AdaLoRA, peft.LoHa, peft.LoKr, peft.VeRA, peft.IA3)):
        layers = _matched(model, method.targets)
        assert layers, method.targets
        if isinstance(method, peft.IA3):
            return sum(m.in_features if any(n.endswith(f) for f in method.feedforward) else m.out_features
                       for n, m in layers)
        if isinstance(method, peft.DoRA):
            return sum(method.r * (m.in_features + m.out_features) + m.out_features for _, m in layers)
        if isinstance(method, peft.LoRA):
            bias = sum(m.bias.numel() for _, m in layers if m.bias is not None) if method.bias == "lora_only" else 0
            return sum(method.r * (m.in_features + m.out_features) for _, m in layers) + bias
        if isinstance(method, peft.AdaLoRA):
            return sum(method.init_r * (m.in_features + m.out_features) + method.init_r for _, m in layers)
        if isinstance(method, peft.LoHa):
            return sum(2 * method.r * (m.in_features + m.out_features) for _, m in layers)
        if isinstance(method, peft.LoKr):
            return sum(_lokr_count(m, method.r) for _, m in layers)
        return sum(method.r + m.out_features for _, m in layers)  # VeRA: lambda_d + lambda_b
    if isinstance(method, peft.Prompt):
        return (len(spec.blocks) if method.deep else 1) * method.n_tokens * D
    if isinstance(method, peft.Prefix):
        return len(spec.blocks) * 2 * method.n_tokens * D
    if isinstance(method, peft.BitFit):
        kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        return sum(m.bias.numel() for m in model.modules()
                   if (isinstance(m, kinds) or _is_norm(m)) and isinstance(getattr(m, "bias", None), nn.Parameter))
    if method.name == "full":
        return _numel(model)
    if isinstance(method, peft.NormTuning):
        return sum(p.numel() for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False))
    if isinstance(method, peft.FiLM):
        return sum(2 * ex.out_features for _, ex, _ in _sites(spec, model, method.placement))
    if isinstance(method, (peft.HyperAdapter, peft.Polyhistor)):  # one hypernetwork: embeddings + generators
        e, p = method.embed_dim, method.proj_dim

        def gen(n):  # a Linear from the projector output s (p) to n values
            return p * n + n

        def width(d):
            return method.bottleneck if method.bottleneck is not None else max(1, round(d / (method.reduction or 12)))

        shapes = [(entry.in_features if method.mode == "parallel" else ex.out_features, ex.out_features)
                  for entry, ex, _ in _sites(spec, model, method.placement)]
        total = method.tasks * e + (2 * e * p + p) + len(shapes) * e  # tasks, projector, layer embeddings
        if isinstance(method, peft.PolyhistorLite):  # one generator set at the smallest width C, m templates
            c, m, r = min(min(sh) for sh in shapes), method.templates, method.rank
            b = width(c)
            total += gen(m * c * r) + gen(r * b) + gen(b) + gen(b * r) + gen(r * m * c) + gen(m * c)
            return total + sum(m * (d_in // c) + m * (d_out // c) for d_in, d_out in shapes)  # kernels
        for d_in, d_out, b in {(d_in, d_out, width(d_out)) for d_in, d_out in shapes}:  # per width group
            if isinstance(method, peft.Polyhistor):
                r = method.rank
                total += gen(d_in * r) + gen(r * b) + gen(b) + gen(b * r) + gen(r * d_out) + gen(d_out)
            else:
                total += gen(d_in * b) + gen(b) + gen(b * d_out) + gen(d_out)
        return total

    # adapters and Compacter
    total = method.phm_dim ** 3 if isinstance(method, peft.Compacter) else 0  # one shared set of A_i
    for entry, ex, norm in _sites(spec, model, method.placement):
        d_out = ex.out_features
        d_in = entry.in_features if method.mode == "parallel" else d_out
        b = method.bottleneck if method.bottleneck is not None else max(1, round(d_out / (method.reduction or 12)))
        if isinstance(method, peft.Compacter):
            n = method.phm_dim
            b = max(n, b - b % n)
            total += d_in + 3 * b + 2 * d_out  # down: s d_in + t b + bias b; up: s b + t d_out + bias d_out
        elif method.kind == "bottleneck":
            total += d_in * b + b + b * d_out + d_out
        elif method.kind == "conformer":
            k = method.kernel_size
            total += 2 * d_in + (d_in * 2 * b + 2 * b) + (b * k + b) + 2 * b + (b * d_out + d_out)
        else:  # convpass
            total += (d_in * b + b) + (9 * b * b + b) + (b * d_out + d_out)
        if method.train_norms:
            total += _numel(norm)
    if getattr(method, "train_norms", False) and spec.final_norm:
        total += _numel(model.get_submodule(spec.final_norm))
    return total


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def setup(tiny, anat: str, variant: str):
    pristine = tiny.backbone(anat)
    model = copy.deepcopy(pristine)
    method = VARIANTS[variant].make(SPECS[anat])
    peft.attach(model, [method])
    return pristine, model, method


def train(tiny, model: nn.Module, x, steps: int = STEPS) -> None:
    """AdamW (no weight decay, so a tensor only moves when it has a gradient) on (out * w).sum()."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(7)
    w = None
    model.train()
    for _ in range(steps):
        out = tiny.tokens(model, x)
        if w is None:
            w = torch.randn(out.shape, generator=g)
        opt.zero_grad()
        (out * w).sum().backward()
        opt.step()
    model.eval()


def _hf_tuner_modules(model: nn.Module) -> list[str]:
    return [f"{n}: {type(m).__name__}" for n, m in model.named_modules() if type(m).__module__.startswith("peft.tuners")]


def _unprefixed(named):
    return {n.replace(".base_layer", ""): t for n, t in named}


def _structure(model: nn.Module):
    return [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


# ----------------------------------------------------------------------------------------------
# a. identity at init
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anat,variant", APPLICABLE)
def test_identity_at_init(tiny, anat, variant):
    pristine, model, _ = setup(tiny, anat, variant)
    x = tiny.input(anat)
    ref, out = tiny.forward(pristine, x), tiny.forward(model, x)
    assert out.shape == ref.shape
    if VARIANTS[variant].identity:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    else:  # learned tokens take part in attention from the start
        assert (out - ref).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------
# b. training touches only the method's tensors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anat,variant", APPLICABLE)
def test_training_updates_only_method_tensors(tiny, anat, variant):
    pristine, model, method = setup(tiny, anat, variant)
    x = tiny.input(anat)
    state = model.peft_state
    params = dict(model.named_parameters())
    assert state.owner and set(state.owner.values()) == {method.name}
    assert {n for n, p in params.items() if p.requires_grad} == set(state.owner)
    before = {n: params[n].detach().clone() for n in state.owner}

    train(tiny, model, x)

    no_grad = [n for n in state.owner if params[n].grad is None]
    assert not no_grad, f"trainable tensors without gradient: {no_grad}"
    unchanged = [n for n in state.owner if torch.equal(params[n], before[n])]
    assert not unchanged, f"trainable tensors that did not move in {STEPS} steps: {unchanged}"

    # every other parameter and buffer of the original backbone is bit-identical
    now = _unprefixed(list(model.named_parameters()) + list(model.named_buffers()))
    owned = {n.replace(".base_layer", "") for n in state.owner}  # LoRA bias="lora_only" trains base biases
    for name, ref in list(pristine.named_parameters()) + list(pristine.named_buffers()):
        assert name in now, f"original tensor {name} is gone"
        if name not in owned:
            assert torch.equal(now[name], ref), f"frozen tensor {name} changed"
            assert not isinstance(now[name], nn.Parameter) or not now[name].requires_grad
    assert not torch.allclose(tiny.forward(model, x), tiny.forward(pristine, x), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# c. save -> load round trip is exact (bare backbone and Classifier)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anat,variant", APPLICABLE)
def test_save_load_round_trip(tiny, anat, variant, tmp_path):
    pristine, model, _ = setup(tiny, anat, variant)
    x = tiny.input(anat)
    fresh, fresh_clf = copy.deepcopy(pristine), copy.deepcopy(pristine)
    clf = peft.Classifier(model, LinearHead(D, 5, pool=SPECS[anat].pool))
    train(tiny, clf, x)  # trains the method's tensors and the head together

    peft.save(model, tmp_path / "b")
    loaded = peft.load(fresh, tmp_path / "b")
    assert loaded is fresh and not isinstance(loaded, peft.Classifier)
    assert torch.equal(tiny.forward(loaded, x), tiny.forward(model, x))
    sd, loaded_sd = model.state_dict(), loaded.state_dict()
    for name in list(model.peft_state.owner) + model.peft_state.buffers:
        assert torch.equal(loaded_sd[name], sd[name]), name

    labels = [f"class{i}" for i in range(5)]
    peft.save(clf, tmp_path / "c", labels=labels)
    loaded_clf = peft.load(fresh_clf, tmp_path / "c")
    assert isinstance(loaded_clf, peft.Classifier) and loaded_clf.backbone is fresh_clf
    assert loaded_clf.labels == labels and loaded_clf.head.config() == clf.head.config()
    logits = tiny.forward(clf, x)
    assert logits.shape == (2, 5)
    assert torch.equal(tiny.forward(loaded_clf, x), logits)


# ----------------------------------------------------------------------------------------------
# d. merge
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anat,variant", APPLICABLE)
def test_merge(tiny, anat, variant):
    _, model, method = setup(tiny, anat, variant)
    x = tiny.input(anat)
    train(tiny, model, x)
    before = tiny.forward(model, x)
    report = peft.merge(model)
    after = tiny.forward(model, x)
    assert set(report) == {method.name}
    if VARIANTS[variant].mergeable:
        assert report[method.name] == "merged"
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
        assert not _hf_tuner_modules(model), "peft layers remain after merge"
        hooks = [(n, fn) for n, m in model.named_modules() for fn in
                 list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())]
        assert not hooks, f"hooks remain after merge: {hooks}"
        assert peft.merge(model) == {method.name: "merged"}  # idempotent
    else:
        assert report[method.name] != "merged" and len(report[method.name]) > 15  # a reason
        assert torch.equal(after, before)


# ----------------------------------------------------------------------------------------------
# e. trainable count
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anat,variant", APPLICABLE)
def test_trainable_count(tiny, anat, variant):
    pristine, model, method = setup(tiny, anat, variant)
    want = expected_count(method, SPECS[anat], pristine)
    s = peft.summary(model)
    assert s["trainable"] == want
    assert s["by_method"] == {method.name: want}
    assert s["total"] == sum(p.numel() for p in model.parameters()) >= want


# ----------------------------------------------------------------------------------------------
# methods that cannot apply refuse clearly and leave the backbone alone
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anat,variant,word", UNSUPPORTED)
def test_unsupported_method_raises_clear_error(tiny, anat, variant, word):
    model = tiny.backbone(anat)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    structure = _structure(model)
    method = VARIANTS[variant].make(SPECS[anat])
    with pytest.raises(ValueError) as err:
        peft.attach(model, [method])
    if method.name in ("prompt", "prefix"):
        assert isinstance(err.value, UnsupportedMethod)
    assert word in str(err.value).lower(), str(err.value)
    assert getattr(model, "peft_state", None) is None
    assert _structure(model) == structure
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items()) and model.state_dict().keys() == sd.keys()


def test_targets_matching_nothing_raise_clearly(tiny):
    model = tiny.backbone("vit")
    with pytest.raises(ValueError, match=r"(?s)targets \('nope',\) matched no layer"):
        peft.attach(model, [peft.LoRA(targets=("nope",))])
    assert getattr(model, "peft_state", None) is None
    assert not _hf_tuner_modules(model)


# ----------------------------------------------------------------------------------------------
# f. composition
# ----------------------------------------------------------------------------------------------
COMPOSITIONS = {
    "vit": lambda s: [peft.LoRA(r=4, alpha=8, targets=s.lora),
                      peft.Adapter(placement="both", mode="parallel", bottleneck=8),
                      peft.Prompt(n_tokens=3, deep=True)],
    "ast": lambda s: [peft.LoRA(r=4, alpha=8, targets=s.lora),
                      peft.Adapter(kind="convpass", placement="mhsa", mode="parallel", bottleneck=8),
                      peft.Prompt(n_tokens=2, deep=False)],
    "swin": lambda s: [peft.LoRA(r=4, alpha=8, targets=s.lora),
                       peft.Adapter(placement="ffn", mode="sequential", bottleneck=8),
                       peft.FiLM(placement="both")],
    "whisper": lambda s: [peft.LoRA(r=4, alpha=8, targets=s.lora),
                          peft.Adapter(kind="conformer", placement="mhsa", mode="parallel", bottleneck=8),
                          peft.Prefix(n_tokens=2), peft.Prompt(n_tokens=2, deep=True)],
}


@pytest.mark.parametrize("anat", list(COMPOSITIONS))
def test_composition(tiny, anat, tmp_path):
    spec = SPECS[anat]
    pristine = tiny.backbone(anat)
    x = tiny.input(anat)
    methods = COMPOSITIONS[anat](spec)
    model = peft.attach(copy.deepcopy(pristine), methods)

    s = peft.summary(model)
    want = {m.name: expected_count(m, spec, pristine) for m in methods}
    assert s["by_method"] == want
    assert sum(s["by_method"].values()) == s["trainable"]

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(tiny, model, x)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and not torch.equal(p, before[n]), n

    peft.save(model, tmp_path / "b")
    loaded = peft.load(copy.deepcopy(pristine), tmp_path / "b")
    assert [k for k, _ in loaded.peft_state.methods] == [k for k, _ in model.peft_state.methods]
    assert torch.equal(tiny.forward(loaded, x), tiny.forward(model, x))
    assert peft.summary(loaded)["by_method"] == want


# ----------------------------------------------------------------------------------------------
# attach called more than once ("Calling attach again adds more methods")
# ----------------------------------------------------------------------------------------------
def test_incremental_attach_save_load_round_trip(tiny, tmp_path):
    """A sequential adapter attached first hooks the plain `proj`; LoRA attached later wraps it, so
    the adapter sees the base output without the LoRA delta. load must rebuild that same order."""
    pristine, x = tiny.backbone("vit"), tiny.input("vit")
    model = copy.deepcopy(pristine)
    peft.attach(model, [peft.Adapter(placement="mhsa", mode="sequential", bottleneck=8)])
    peft.attach(model, [peft.LoRA(r=4, alpha=8, targets=("proj",))])
    train(tiny, model, x)
    peft.save(model, tmp_path / "b")
    loaded = peft.load(copy.deepcopy(pristine), tmp_path / "b")
    assert [k for k, _ in loaded.peft_state.methods] == [k for k, _ in model.peft_state.methods]
    torch.testing.assert_close(tiny.forward(loaded, x), tiny.forward(model, x), atol=0, rtol=0)


def test_merge_after_incremental_attach(tiny):
    """FiLM attached first hooks the plain `proj`; LoRA attached later wraps it. Merging must
    remove FiLM's hook from the layer it was installed on, or FiLM is applied twice."""
    x = tiny.input("vit")
    model = tiny.backbone("vit")
    peft.attach(model, [peft.FiLM(placement="mhsa")])
    peft.attach(model, [peft.LoRA(r=4, alpha=8, targets=("proj",))])
    train(tiny, model, x)
    before = tiny.forward(model, x)
    assert peft.merge(model) == {"film": "merged", "lora": "merged"}
    torch.testing.assert_close(tiny.forward(model, x), before, atol=1e-5, rtol=0)
    assert not [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


# ----------------------------------------------------------------------------------------------
# an attach that fails on a bad config leaves the backbone as it was
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [
    pytest.param(peft.Adapter(placement="ffn", blocks=(0, 7)), id="adapter-block-out-of-range"),
    pytest.param(peft.Compacter(placement="ffn", bottleneck=10, phm_dim=5), id="compacter-indivisible-width"),
])
def test_failed_attach_leaves_backbone_untouched(tiny, method):
    model = tiny.backbone("vit")
    structure = _structure(model)
    with pytest.raises(ValueError):
        peft.attach(model, [method])
    assert getattr(model, "peft_state", None) is None
    assert _structure(model) == structure
