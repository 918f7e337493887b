"""Adapter bundles: what they contain, atomic writes, and clear errors before the backbone is touched."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import shared.artifacts
from shared import peft
from shared.heads import LinearHead

LABELS = ["dog", "rain", "siren"]
METRICS = {"val/acc": 0.75, "val/loss": 0.5}


def _methods():
    return [peft.LoRA(r=4, alpha=8, targets=("qkv",)),
            peft.Adapter(placement="ffn", mode="parallel", bottleneck=8)]


def _trained(tiny, pristine, steps=1, seed=3):
    """A Classifier with LoRA + adapter + linear head, moved away from its init."""
    model = peft.Classifier(peft.attach(copy.deepcopy(pristine), _methods()), LinearHead(32, 3, pool="cls"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tiny.input("vit", seed=seed)
    for _ in range(steps):
        opt.zero_grad()
        tiny.tokens(model, x).square().sum().backward()
        opt.step()
    return model.eval()


@pytest.fixture
def pristine(tiny):
    return tiny.backbone("vit")


@pytest.fixture
def bundle(tiny, pristine, tmp_path):
    model = _trained(tiny, pristine)
    path = peft.save(model, tmp_path / "b", labels=LABELS, metrics=METRICS)
    return model, path


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
            [p.requires_grad for p in model.parameters()])


def _assert_untouched(model, snap):
    sd, structure, grads = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks))
            for n, m in model.named_modules()] == structure
    assert [p.requires_grad for p in model.parameters()] == grads


def _fails_cleanly(backbone, path, *words, **kw):
    """load raises BundleError whose message names the problem; the backbone is left as it was."""
    had_state = getattr(backbone, "peft_state", None)
    snap = _snapshot(backbone)
    with pytest.raises(peft.BundleError) as err:
        peft.load(backbone, path, **kw)
    msg = str(err.value).lower()
    for w in words:
        assert w.lower() in msg, msg
    _assert_untouched(backbone, snap)
    assert getattr(backbone, "peft_state", None) is had_state
    return msg


def _edit_json(path, fn):
    meta_path = Path(path) / "adapter.json"
    meta = json.loads(meta_path.read_text())
    fn(meta)
    meta_path.write_text(json.dumps(meta))


# ----------------------------------------------------------------------------------------------
# contents
# ----------------------------------------------------------------------------------------------
def test_bundle_contents(tiny, pristine, bundle):
    model, path = bundle
    assert sorted(os.listdir(path)) == ["adapter.json", "adapter.safetensors"]  # no pickle anywhere
    raw = (path / "adapter.safetensors").read_bytes()
    assert not raw.startswith((b"\x80", b"PK"))  # neither a pickle stream nor a torch zip archive

    meta = json.loads((path / "adapter.json").read_text())
    assert meta["backbone"]["fingerprint"] == peft.fingerprint(pristine)
    assert meta["backbone"]["id"] == model.backbone.peft_state.backbone_id and meta["backbone"]["id"]
    assert meta["backbone"]["class"] == "VisionTransformer"
    assert meta["methods"] == [
        {"key": "lora", "name": "lora", "r": 4, "alpha": 8, "targets": ["qkv"], "exclude": [], "dropout": 0.0,
         "bias": "none"},
        {"key": "adapter", **_methods()[1].to_dict()},
    ]
    assert meta["methods"][1]["bottleneck"] == 8 and meta["methods"][1]["placement"] == "ffn"
    assert meta["head"] == {"kind": "linear", "dim": 32, "num_classes": 3, "pool": "cls", "norm": False, "dropout": 0.0}
    assert meta["labels"] == LABELS and meta["metrics"] == METRICS
    assert isinstance(meta["library_version"], str) and meta["library_version"]

    # only trained tensors (method + head), nothing frozen from the backbone
    state = model.backbone.peft_state
    want = {f"backbone.{n}" for n in list(state.owner) + state.buffers} | \
           {f"head.{n}" for n in model.head.state_dict()}
    with safe_open(str(path / "adapter.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert set(stored) == want == set(meta["tensors"])
    assert not any("base_layer" in k or k.endswith("attn.qkv.weight") for k in stored)
    sd = model.backbone.state_dict()
    for n in state.owner:
        assert torch.equal(stored[f"backbone.{n}"], sd[n])


def test_load_reproduces_classifier(tiny, pristine, bundle):
    model, path = bundle
    x = tiny.input("vit")
    loaded = peft.load(copy.deepcopy(pristine), path)
    assert isinstance(loaded, peft.Classifier) and loaded.labels == LABELS
    assert loaded.bundle_meta["metrics"] == METRICS
    assert torch.equal(tiny.forward(loaded, x), tiny.forward(model, x))


# ----------------------------------------------------------------------------------------------
# bad bundles: a clear BundleError before the backbone is modified
# ----------------------------------------------------------------------------------------------
def test_wrong_fingerprint(tiny, bundle):
    _, path = bundle
    other = tiny.backbone("vit", seed=1)  # same architecture, different random weights
    _fails_cleanly(other, path, "fingerprint", "check_fingerprint=False")


def test_shape_mismatch_other_width(tiny, bundle):
    _, path = bundle
    wider = tiny.backbone("vit", embed_dim=48)
    msg = _fails_cleanly(wider, path, "shape", check_fingerprint=False)
    assert "blocks.0" in msg  # names the offending tensor


def test_shape_mismatch_edited_config(tiny, pristine, bundle):
    _, path = bundle
    _edit_json(path, lambda m: m["methods"][1].update(bottleneck=16))
    msg = _fails_cleanly(copy.deepcopy(pristine), path, "shape")
    assert "peft_adapter_ffn" in msg and "(8, 32)" in msg and "(16, 32)" in msg


def test_unknown_method(tiny, pristine, bundle):
    _, path = bundle
    _edit_json(path, lambda m: m["methods"][0].update(name="lorra"))
    _fails_cleanly(copy.deepcopy(pristine), path, "unknown method", "lorra")


def test_unknown_method_field(tiny, pristine, bundle):
    _, path = bundle
    _edit_json(path, lambda m: m["methods"][1].update(bottlenek=8))
    _fails_cleanly(copy.deepcopy(pristine), path, "bottlenek")


def test_corrupt_json(tiny, pristine, bundle):
    _, path = bundle
    (path / "adapter.json").write_text('{"format": "peft-suite-adapter", "methods": [')
    _fails_cleanly(copy.deepcopy(pristine), path, "adapter.json", "corrupt json")


def test_not_a_bundle_json(tiny, pristine, bundle):
    _, path = bundle
    (path / "adapter.json").write_text('{"hello": 1}')
    _fails_cleanly(copy.deepcopy(pristine), path, "adapter.json", "not a peft-suite-adapter")


def test_truncated_safetensors(tiny, pristine, bundle):
    _, path = bundle
    f = path / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails_cleanly(copy.deepcopy(pristine), path, "adapter.safetensors", "truncated")


def test_truncated_safetensors_with_matching_checksum(tiny, pristine, bundle):
    """Even when the json's checksum was updated, the safetensors reader's error becomes a BundleError."""
    _, path = bundle
    f = path / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _edit_json(path, lambda m: m.update(sha256=shared.artifacts.sha256_file(f)))
    _fails_cleanly(copy.deepcopy(pristine), path, "adapter.safetensors", "unreadable")


@pytest.mark.parametrize("missing", ["adapter.json", "adapter.safetensors", "."])
def test_missing_files(tiny, pristine, bundle, missing):
    _, path = bundle
    target = path / missing
    if missing == ".":
        path = path.with_name("nowhere")
    else:
        target.unlink()
    _fails_cleanly(copy.deepcopy(pristine), path, "not found", missing if missing != "." else "adapter.json")


def test_load_into_attached_backbone(tiny, pristine, bundle):
    _, path = bundle
    attached = peft.attach(copy.deepcopy(pristine), [peft.BitFit()])
    _fails_cleanly(attached, path, "already has peft methods")
    assert [k for k, _ in attached.peft_state.methods] == ["bitfit"]


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------
def test_save_replaces_existing_bundle(tiny, pristine, tmp_path):
    x = tiny.input("vit")
    first, second = _trained(tiny, pristine, seed=3), _trained(tiny, pristine, steps=2, seed=4)
    assert not torch.equal(tiny.forward(first, x), tiny.forward(second, x))
    path = peft.save(first, tmp_path / "b", metrics={"step": 1})
    (path / "stale.txt").write_text("left over from an older writer")
    assert peft.save(second, tmp_path / "b", metrics={"step": 2}) == path

    assert os.listdir(tmp_path) == ["b"]  # no temp or backup folders left behind
    assert sorted(os.listdir(path)) == ["adapter.json", "adapter.safetensors"]  # the folder was replaced, not merged
    assert peft.read_meta(path)["metrics"] == {"step": 2}
    assert torch.equal(tiny.forward(peft.load(copy.deepcopy(pristine), path), x), tiny.forward(second, x))


def test_failed_save_keeps_old_bundle(tiny, pristine, bundle, monkeypatch):
    model, path = bundle
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(shared.artifacts, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        peft.save(_trained(tiny, pristine, seed=5), path, metrics={"new": 1})
    assert os.listdir(path.parent) == [path.name]  # no temp folder remains
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before

    with pytest.raises(OSError):  # a first save that fails leaves nothing at all
        peft.save(model, path.parent / "fresh")
    assert os.listdir(path.parent) == [path.name]
    monkeypatch.undo()
    x = tiny.input("vit")
    assert torch.equal(tiny.forward(peft.load(copy.deepcopy(pristine), path), x), tiny.forward(model, x))


def test_save_after_merge_is_refused(tiny, pristine, tmp_path):
    model = peft.attach(copy.deepcopy(pristine), [peft.LoRA(r=4, targets=("qkv",))])
    peft.merge(model)
    with pytest.raises(peft.BundleError, match="merge"):
        peft.save(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()
