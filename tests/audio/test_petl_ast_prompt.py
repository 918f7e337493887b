"""Prompt tuning as PETL-AST runs it (src/AST_prompt_tuning.py, PromptAST with FINAL_OUTPUT "ALL"):
VPT's uniform init, the distillation token dropped, the prompt outputs kept for mean pooling,
and the recipe `domains/audio/methods/prompt.yaml` using all three."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

from shared import backbones, heads, peft

RECIPE = Path(__file__).resolve().parents[2] / "domains" / "audio" / "methods" / "prompt.yaml"


def _prompt_module(model):
    (mod,) = [m for m in model.modules() if type(m).__name__ == "PromptTokens"]
    return mod


def test_vpt_bound_is_the_anchor_formula():
    """sqrt(6 / (3 * 16 * 16 + D)): 0.0625 for the real AST (D 768), sqrt(6 / 800) for D 32."""
    ast = backbones.create("tiny-ast")  # 16x16 patch embedding, as every AST
    assert peft.Prompt.patch_size(ast) == (16, 16)
    assert peft.Prompt(init="vpt_uniform").vpt_bound(ast, 768) == 0.0625
    assert peft.Prompt(init="vpt_uniform").vpt_bound(ast, 32) == pytest.approx(0.08660254037844387, abs=1e-15)
    vit = backbones.create("tiny-vit")  # 8x8 patches, D 32: sqrt(6 / (192 + 32))
    assert peft.Prompt.patch_size(vit) == (8, 8)
    assert peft.Prompt(init="vpt_uniform").vpt_bound(vit, 32) == pytest.approx(math.sqrt(6 / 224), abs=1e-15)


def test_vpt_uniform_init_statistics():
    """U(-a, a), a = sqrt(6/800): every value inside, max |v| near a, mean 0, variance a^2 / 3."""
    torch.manual_seed(0)
    model = peft.attach(backbones.create("tiny-ast"), [peft.Prompt(n_tokens=200, deep=True, init="vpt_uniform")])
    t = _prompt_module(model).tokens.detach().double()
    a = math.sqrt(6 / 800)
    assert t.shape == (2, 200, 32)  # one set per block (deep), as the anchor's shallow + L-1 deep sets
    assert t.abs().max().item() <= a
    assert t.abs().max().item() > 0.99 * a
    assert abs(t.mean().item()) < 0.02 * a
    assert t.var().item() == pytest.approx(a * a / 3, rel=0.05)
    assert (t.abs() > 3 * 0.02).float().mean().item() > 0.2  # not the trunc-normal(0.02) default


def test_default_init_is_still_trunc_normal():
    torch.manual_seed(0)
    model = peft.attach(backbones.create("tiny-ast"), [peft.Prompt(n_tokens=200, deep=True)])
    t = _prompt_module(model).tokens.detach().double()
    assert t.std().item() == pytest.approx(0.02, rel=0.05)


def test_prompt_options_are_validated():
    with pytest.raises(ValueError, match="init"):
        peft.Prompt(init="xavier")
    with pytest.raises(ValueError, match="keep_prefix"):
        peft.Prompt(keep_prefix=-1)
    with pytest.raises(ValueError, match="keep_prefix"):
        peft.attach(backbones.create("tiny-ast"), [peft.Prompt(keep_prefix=3)])  # AST has 2 prefix tokens


def _anchor_logits(bare, prompts, head, x):
    """PromptAST.forward (DEEP, FINAL_OUTPUT "ALL") written out by hand with the bare AST's parts:
    [CLS, P_0, patches] (distillation token dropped), P_i replaces positions 1..n before block i,
    final LayerNorm, mean over every token, linear head."""
    n = prompts.shape[1]
    e = bare.embeddings(x)  # (B, 2 + F*T, D)
    b = x.shape[0]
    h = torch.cat([e[:, :1], prompts[0].expand(b, -1, -1), e[:, 2:]], dim=1)
    for i, layer in enumerate(bare.layers):
        if i > 0:
            h = torch.cat([h[:, :1], prompts[i].expand(b, -1, -1), h[:, 1 + n:]], dim=1)
        h = layer(h)
    h = bare.layernorm(h)
    return head.fc(h.mean(1)), h


def test_anchor_pooling_equals_hand_computation_on_tiny_ast():
    backbone = backbones.create("tiny-ast")  # 64 frames x 32 mel: grid 2 x 5, D 32, 2 blocks
    bare = copy.deepcopy(backbone).eval()
    method = peft.Prompt(n_tokens=3, deep=True, init="vpt_uniform", keep_prefix=1, keep_outputs=True)
    model = peft.attach(backbone, [method])
    head = heads.LinearHead(32, 4, pool="mean")
    clf = peft.Classifier(model, head).eval()
    prompts = _prompt_module(model).tokens.detach()
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        tokens = clf.tokens(x)
        logits = clf(x)
        want_logits, want_h = _anchor_logits(bare, prompts, head, x)
    # CLS + 3 prompt outputs + 2*5 patches; the prompts count as non-patch tokens
    assert tokens.x.shape == (2, 1 + 3 + 10, 32) and tokens.num_prefix == 4 and tokens.grid == (2, 5)
    torch.testing.assert_close(tokens.x, want_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    # pool "patch_mean" = the anchor's "SPEECH", "cls" = its "CLS"
    torch.testing.assert_close(tokens.pool("patch_mean"), want_h[:, 4:].mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens.pool("cls"), want_h[:, 0], atol=1e-5, rtol=1e-5)
    # our default (distillation kept, prompt outputs stripped) is a different function
    other = peft.Classifier(peft.attach(copy.deepcopy(bare), [peft.Prompt(n_tokens=3, deep=True)]), head).eval()
    with torch.no_grad():
        assert other.tokens(x).x.shape == (2, 2 + 10, 32)
        assert not torch.allclose(other(x), logits, atol=1e-4)


def test_dropped_distillation_with_stripped_prompts_keeps_a_consistent_layout():
    """keep_prefix=1 without keep_outputs: [CLS, patches], num_prefix 1, patch map still valid."""
    model = peft.attach(backbones.create("tiny-ast"), [peft.Prompt(n_tokens=3, keep_prefix=1)])
    with torch.no_grad():
        t = backbones.anatomy(model).forward_tokens(torch.randn(2, 64, 32))
    assert t.x.shape == (2, 1 + 10, 32) and t.num_prefix == 1
    assert t.patch_map().shape == (2, 32, 2, 5)


def test_prompt_tensors_follow_the_backbone_dtype():
    model = peft.attach(backbones.create("tiny-ast").to(torch.bfloat16),
                        [peft.Prompt(n_tokens=3, init="vpt_uniform", keep_prefix=1, keep_outputs=True)])
    assert _prompt_module(model).tokens.dtype == torch.bfloat16
    with torch.no_grad():
        out = backbones.anatomy(model).forward_tokens(torch.randn(1, 64, 32, dtype=torch.bfloat16))
    assert out.x.dtype == torch.bfloat16 and out.x.shape == (1, 14, 32)


def test_recipe_is_petl_ast():
    model_cfg = yaml.safe_load(RECIPE.read_text())["model"]
    methods = [peft.METHODS[m["name"]](**{k: v for k, v in m.items() if k != "name"}) for m in model_cfg["methods"]]
    assert methods[0] == peft.Prompt(n_tokens=25, deep=True, init="vpt_uniform", keep_prefix=1, keep_outputs=True)
    assert methods[1] == peft.NormTuning(final_only=True)  # PETL-AST trains the final LayerNorm too
    assert model_cfg["head"] == {"kind": "linear", "pool": "mean"}
    assert model_cfg["lr"] == 1.0e-2
    # on a tiny AST: trainable = 2 blocks x 25 x 32 prompts + final LayerNorm (2 x 32)
    model = peft.attach(backbones.create("tiny-ast"), methods)
    assert peft.summary(model)["trainable"] == 2 * 25 * 32 + 2 * 32
