"""`peft.AdapterBank`: one loaded backbone answers a batch whose rows use different adapters.

Method x backbone: LoRA and bottleneck adapters (parallel, sequential) on every tiny anatomy; the
mixed batch must equal each row through its own adapter, one adapter at a time, to 1e-5 (fp32).
Then bundles (heads, per-adapter scaling), HF peft's own mixed batch as a reference, threads, and
the refusals (shapes, methods, names, merged models).
"""
from __future__ import annotations

import copy

import pytest
import torch

from shared import peft
from shared.heads import LinearHead

NAMES = ["a", "c", "b", "c"]  # 4 rows, 3 adapters, one adapter twice and not adjacent
LORA_TARGETS = {"vit": ["qkv", "fc1"], "swin": ["qkv", "fc1"], "ast": ["q_proj", "v_proj"],
                "whisper": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
METHODS = {
    "lora": lambda anat: peft.LoRA(r=4, alpha=8, targets=LORA_TARGETS[anat]),
    "adapter_parallel": lambda anat: peft.Adapter(placement="both", mode="parallel", bottleneck=8),
    "adapter_sequential": lambda anat: peft.Adapter(placement="ffn", mode="sequential", bottleneck=8),
}


def _batch(tiny, anat):
    return torch.cat([tiny.input(anat, seed=1), tiny.input(anat, seed=2)])  # 4 rows


def _randomise(model, seed):
    """Give every trained tensor random values (LoRA's B and the adapters' up start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _bank(tiny, anat, method, k=3):
    model = peft.attach(tiny.backbone(anat), [method])
    bank = peft.AdapterBank(model)
    for i, name in enumerate("abc"[:k]):
        _randomise(model, seed=10 + i)
        bank.add(name)  # a snapshot of the adapter now in the model
    return model, bank


def _one_at_a_time(tiny, bank, model, x, names, run=None):
    run = run or (lambda: tiny.forward(model, x))
    rows = []
    for i, name in enumerate(names):
        bank.use(name)
        rows.append(run()[i])  # the whole batch through this adapter: row i is its answer
    return torch.stack(rows)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("anat", list(LORA_TARGETS))
def test_mixed_batch_equals_one_adapter_at_a_time(tiny, anat, method):
    model, bank = _bank(tiny, anat, METHODS[method](anat))
    x = _batch(tiny, anat)
    with torch.no_grad(), bank.rows(NAMES):
        mixed = tiny.tokens(model.eval(), x)
    ref = _one_at_a_time(tiny, bank, model, x, NAMES)
    torch.testing.assert_close(mixed, ref, atol=1e-5, rtol=0)
    bank.use("a")
    only_a = tiny.forward(model, x)
    assert (mixed[1:] - only_a[1:]).abs().max() > 1e-3  # rows 1..3 really went through other adapters
    torch.testing.assert_close(tiny.forward(model, x), only_a, atol=0, rtol=0)  # outside rows: the live adapter


def test_lora_and_adapter_together_with_the_call_form(tiny):
    model = peft.attach(tiny.backbone("vit"), [peft.LoRA(r=4, alpha=8, targets=["qkv"]),
                                                peft.Adapter(placement="ffn", mode="parallel", bottleneck=8)])
    bank = peft.AdapterBank(model)
    for i, name in enumerate("abc"):
        _randomise(model, seed=20 + i)
        bank.add(name)
    x = _batch(tiny, "vit")
    with torch.no_grad():
        mixed = bank(x, adapters=NAMES)  # model(x) with per-row adapters: timm's pooled features
    ref = _one_at_a_time(tiny, bank, model, x, NAMES, run=lambda: model(x))
    torch.testing.assert_close(mixed, ref, atol=1e-5, rtol=0)


def test_bundles_with_heads_and_their_own_scaling(tiny, tmp_path):
    """Three bundles: same rank, different LoRA alpha / adapter scale and heads; the bank's logits per
    row equal each bundle loaded on its own."""
    def bundle(name, seed, alpha, scale):
        model = peft.attach(tiny.backbone("vit"), [peft.LoRA(r=4, alpha=alpha, targets=["qkv"]),
                                                    peft.Adapter(placement="ffn", mode="sequential", bottleneck=8,
                                                                 scale=scale)])
        clf = peft.Classifier(model, LinearHead(32, 5, pool="cls"), labels=[f"c{i}" for i in range(5)])
        _randomise(clf, seed)
        return peft.save(clf, tmp_path / name)

    paths = {"a": bundle("a", 1, 8.0, 1.0), "b": bundle("b", 2, 2.0, 0.5), "c": bundle("c", 3, 16.0, 2.0)}
    x = _batch(tiny, "vit")
    alone = {n: peft.load(tiny.backbone("vit"), p).eval() for n, p in paths.items()}
    with torch.no_grad():
        own = {n: m(x) for n, m in alone.items()}  # each bundle on its own
    served = alone["a"]
    bank = peft.AdapterBank(served, paths)
    with torch.no_grad():
        mixed = bank(x, adapters=NAMES)  # (4, 5) logits
    assert mixed.shape == (4, 5)
    torch.testing.assert_close(mixed, torch.stack([own[n][i] for i, n in enumerate(NAMES)]), atol=1e-5, rtol=0)
    assert bank.factors["b"] == {"lora": 0.25, "adapter": 0.5}
    with pytest.raises(ValueError, match=r"adapter 'b' scales method\(s\) \['adapter', 'lora'\] differently"):
        bank.use("b")  # the live layers carry a's scaling: b is served per row only
    bank.use("a")
    with torch.no_grad():
        torch.testing.assert_close(served(x), own["a"], atol=0, rtol=0)


def test_matches_hf_peft_mixed_batch(tiny):
    """Reference: HF peft's `adapter_names` mixed batch on a PeftModel holding the same three LoRAs."""
    import peft as hf_peft

    pristine = tiny.backbone("vit")
    _, bank = _bank(tiny, "vit", peft.LoRA(r=4, alpha=8, targets=["qkv"]))
    cfg = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"])
    ref = hf_peft.get_peft_model(copy.deepcopy(pristine), cfg, adapter_name="a")
    for name in "bc":
        ref.add_adapter(name, cfg)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, state in bank.states.items():
            for k, v in state.items():  # ours: blocks.0.attn.qkv.lora_A.lora.weight
                params["base_model.model." + k.replace(".lora.", f".{name}.")].copy_(v)
    x = _batch(tiny, "vit")
    ref.eval()
    with torch.no_grad():
        want = ref(x, adapter_names=NAMES)
        got = bank(x, adapters=NAMES)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_threads_serving_different_rows_do_not_see_each_other(tiny):
    model, bank = _bank(tiny, "vit", peft.Adapter(placement="both", mode="parallel", bottleneck=8))
    x = _batch(tiny, "vit")
    plans = [NAMES, ["b", "b", "a", "c"], ["c", "a", "a", "b"], ["a", "a", "a", "a"]]
    model.eval()
    with torch.no_grad():
        want = [bank(x, adapters=p) for p in plans]
    got = [None] * len(plans)

    def work(i):
        with torch.no_grad():
            for _ in range(3):
                got[i] = bank(x, adapters=plans[i])

    tiny.threads(work, len(plans))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_a_deep_copy_serves_itself(tiny):
    model, bank = _bank(tiny, "vit", peft.LoRA(r=4, alpha=8, targets=["qkv"]))
    x = _batch(tiny, "vit")
    twin = copy.deepcopy(model)
    torch.testing.assert_close(tiny.forward(twin, x), tiny.forward(model, x), atol=0, rtol=0)
    with torch.no_grad(), bank.rows(NAMES), pytest.raises(RuntimeError, match="another model"):
        twin(x)  # the copy's layers are not the bank's: refused, never answered with the live adapter


# ------------------------------------------------------------------------------------------ refusals


def test_unknown_names_and_wrong_row_counts_are_refused(tiny):
    _, bank = _bank(tiny, "vit", peft.LoRA(r=4, alpha=8, targets=["qkv"]))
    x = _batch(tiny, "vit")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]; the bank holds a, b, c"):
        bank(x, adapters=["a", "zz", "a", "b"])
    with pytest.raises(ValueError, match="3 adapter names for a batch of 4 rows"):
        bank(x, adapters=["a", "b", "c"])
    with pytest.raises(ValueError, match="one per row"):
        bank(x, adapters="a")
    with pytest.raises(ValueError, match="unknown adapter"):
        bank.use("zz")


def test_mismatched_shapes_and_methods_are_refused_untouched(tiny, tmp_path):
    _, bank = _bank(tiny, "vit", peft.LoRA(r=4, alpha=8, targets=["qkv"]))
    other = peft.attach(tiny.backbone("vit"), [peft.LoRA(r=2, alpha=8, targets=["qkv"])])
    with pytest.raises(ValueError, match=r"adapter 'r2' does not fit .*one method and shape.*shape blocks\.0\.attn\.qkv"
                                         r"\.lora_A\.lora\.weight: \(2, 32\) vs the model's \(4, 32\)"):
        bank.add("r2", {n: p.detach() for n, p in other.named_parameters() if p.requires_grad})
    peft.save(other, tmp_path / "r2")
    with pytest.raises(peft.BundleError, match=r"methods \[lora: r=2 .*\] are not the model's \[lora: r=4 .*"
                                               r"different ranks or methods per row are not supported"):
        bank.add("r2", tmp_path / "r2")
    adapter = peft.attach(tiny.backbone("vit"), [peft.Adapter(bottleneck=8)])
    peft.save(adapter, tmp_path / "adapter")
    with pytest.raises(peft.BundleError, match=r"methods \[adapter: .*\] are not the model's \[lora: "):
        bank.add("ad", tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"missing \['blocks\.0\.attn\.qkv\.lora_A\.lora\.weight'"):
        bank.add("half", {k: v for k, v in bank.states["a"].items() if "blocks.0.attn.qkv.lora_A" not in k})
    assert bank.names == ["a", "b", "c"]  # nothing was added


def test_bundle_of_other_backbone_weights_is_refused(tiny, tmp_path):
    model = peft.attach(tiny.backbone("vit", seed=0), [peft.LoRA(r=4, alpha=8, targets=["qkv"])])
    bank = peft.AdapterBank(model)
    other = peft.attach(tiny.backbone("vit", seed=1), [peft.LoRA(r=4, alpha=8, targets=["qkv"])])
    peft.save(other, tmp_path / "seed1")
    with pytest.raises(peft.BundleError, match="weights fingerprint"):
        bank.add("s1", tmp_path / "seed1")
    peft.AdapterBank(model, {"s1": tmp_path / "seed1"}, check_fingerprint=False)  # when asked for


def test_merged_models_and_unserved_methods_are_refused(tiny):
    model, bank = _bank(tiny, "vit", peft.LoRA(r=4, alpha=8, targets=["qkv"]))
    peft.merge(model)
    with pytest.raises(ValueError, match=r"AdapterBank: methods \['lora'\] were merged"):
        bank(_batch(tiny, "vit"), adapters=NAMES)
    with pytest.raises(ValueError, match=r"methods \['lora'\] were merged"):
        peft.AdapterBank(model)
    later, bank = _bank(tiny, "vit", peft.LoRA(r=4, alpha=8, targets=["qkv"]))
    peft.attach(later, [peft.Adapter(bottleneck=4)])  # the bank would not serve the new adapter's rows
    with pytest.raises(ValueError, match="methods were attached to the model after the bank was made"):
        bank(_batch(tiny, "vit"), adapters=NAMES)
    for method in (peft.DoRA(r=4, targets=["qkv"]), peft.BitFit(), peft.Adapter(kind="convpass", bottleneck=4),
                   peft.LoRA(r=4, targets=["qkv"], bias="lora_only")):
        with pytest.raises(ValueError, match=f"methods {method.name} \\({method.name}\\) are not served"):
            peft.AdapterBank(peft.attach(tiny.backbone("vit"), [method]))
