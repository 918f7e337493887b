"""Interop with Hugging Face peft's own adapter format: `adapter_config.json` + `adapter_model.safetensors`.

    python -m shared.interop export <bundle> <out_dir> [--base-model <hub id or path>]

`export_peft(bundle, out)` writes a bundle's LoRA-family adapter (LoRA, DoRA, IA3) so that
`peft.PeftModel.from_pretrained(base_model, out)` loads it and computes the same outputs; a
classification head, which peft's format cannot hold, goes beside it as
`peft_suite_head.safetensors` + `peft_suite_head.json`. `import_peft(folder, backbone)` goes
the other way: it attaches the equivalent method to `backbone` and loads peft's tensors
(validated by name and shape before the backbone is touched); `shared.peft.save` then makes it a
bundle. Only tensors move: our bundle key `<module>.lora_A.<method key>.weight` is peft's
`base_model.model.<module>.lora_A.weight`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.artifacts import BundleError, read_checked_tensors, read_meta, resolve
from shared.fs import replace_dir

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
EXPORTABLE = ("lora", "dora", "ia3")


def peft_name(name: str, key: str) -> str:
    """Our backbone tensor name -> the name peft saves (adapter name removed)."""
    parts = name.split(".")
    if key not in parts:
        raise BundleError(f"tensor {name!r} does not belong to method {key!r}")
    parts.remove(key)
    if parts[-2:] == ["lora_magnitude_vector", "weight"]:  # DoRA: peft saves the vector without '.weight'
        parts.pop()
    return PREFIX + ".".join(parts)


def _method(meta: dict[str, Any], where: Path):
    from shared.peft.base import from_dict

    methods = meta.get("methods") or []
    if len(methods) != 1 or methods[0].get("name") not in EXPORTABLE:
        names = [m.get("name") for m in methods]
        raise BundleError(f"{where}: peft's format holds exactly one adapter of kind {'/'.join(EXPORTABLE)}; "
                          f"this bundle has {names or 'none'}")
    m = methods[0]
    return m["key"], from_dict({k: v for k, v in m.items() if k != "key"})


def export_peft(bundle: str | os.PathLike, out: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write `out/adapter_config.json` + `out/adapter_model.safetensors` (+ the head); atomic."""
    import tempfile

    from shared.artifacts import save_tensors

    folder = resolve(bundle)
    meta = read_meta(folder)
    key, method = _method(meta, folder / "adapter.json")
    tensors = read_checked_tensors(folder / "adapter.safetensors", meta["sha256"])
    adapter = {peft_name(k.removeprefix("backbone."), key): v for k, v in tensors.items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    config = method.peft_config()
    config.base_model_name_or_path = base_model or meta["backbone"].get("id")
    config.inference_mode = True
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config.save_pretrained(str(stage))
        save_tensors(adapter, stage / PEFT_WEIGHTS, metadata={"format": "pt"})
        if head:
            save_tensors(head, stage / "peft_suite_head.safetensors", metadata={"format": "pt"})
            (stage / "peft_suite_head.json").write_text(json.dumps(
                {"head": meta.get("head"), "labels": meta.get("labels"), "preprocessing": meta.get("preprocessing"),
                 "backbone": meta["backbone"]}, indent=2))
        replace_dir(stage, out)
    except BaseException:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _from_peft_config(cfg: dict[str, Any], where: Path):
    from shared.peft import METHODS

    kind = cfg.get("peft_type")
    unsupported = {k: cfg.get(k) for k in ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern",
                                             "use_rslora", "fan_in_fan_out") if cfg.get(k)}
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg["bias"]
    if unsupported:
        raise BundleError(f"{where}: peft options with no peft-suite equivalent: {unsupported}")
    targets = cfg.get("target_modules")
    targets = targets if isinstance(targets, str) else tuple(sorted(targets or ()))
    exclude = tuple(cfg.get("exclude_modules") or ())
    if kind == "LORA":
        cls = METHODS["dora" if cfg.get("use_dora") else "lora"]
        return cls(r=cfg["r"], alpha=cfg["lora_alpha"], targets=targets, exclude=exclude,
                   dropout=cfg.get("lora_dropout", 0.0))
    if kind == "IA3":
        return METHODS["ia3"](targets=targets, feedforward=tuple(sorted(cfg.get("feedforward_modules") or ())),
                              exclude=exclude)
    raise BundleError(f"{where}: peft_type {kind!r} is not importable (supported: LORA, IA3)")


def import_peft(folder: str | os.PathLike, backbone: nn.Module, backbone_id: str | None = None) -> nn.Module:
    """Attach the adapter in peft's format at `folder` to `backbone` and load its tensors."""
    from safetensors import SafetensorError, safe_open

    from shared.artifacts import trained_tensors
    from shared.peft import attach, weightless_copy

    folder = Path(folder)
    cfg_path, w_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise BundleError(f"{p}: not found (a peft adapter folder has {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{cfg_path}: corrupt json ({e})") from None
    method = _from_peft_config(cfg, cfg_path)
    try:
        with safe_open(str(w_path), framework="pt") as f:
            theirs = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{w_path}: unreadable safetensors file ({e})") from None
    if getattr(backbone, "peft_state", None) is not None:
        raise BundleError("the backbone already has PEFT methods attached; import into a fresh backbone")
    ghost = attach(weightless_copy(backbone), [method], compute_fingerprint=False)
    key = ghost.peft_state.methods[0][0]
    names = {peft_name(n, key): n for n in trained_tensors(ghost)}
    shapes = {n: tuple(t.shape) for n, t in trained_tensors(ghost).items()}
    missing, unexpected = sorted(set(names) - set(theirs)), sorted(set(theirs) - set(names))
    wrong = sorted(k for k in set(names) & set(theirs) if tuple(theirs[k].shape) != shapes[names[k]])
    if missing or unexpected or wrong:
        raise BundleError(f"{folder}: does not fit {type(backbone).__name__}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")
    del ghost
    attach(backbone, [method], backbone_id=backbone_id)
    sd = backbone.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, t in theirs.items():
            sd[names[k]].copy_(t)
    return backbone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shared.interop", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write a bundle in peft's format")
    ex.add_argument("bundle")
    ex.add_argument("out", type=Path)
    ex.add_argument("--base-model", help="recorded as base_model_name_or_path (default: the bundle's backbone id)")
    args = ap.parse_args(argv)
    try:
        print(export_peft(args.bundle, args.out, args.base_model))
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
