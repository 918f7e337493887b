"""`python -m audio.predict --adapter runs/esc50/adapter clip.wav [...]`: top-k labels per file.

Loads only what the bundle names: its backbone (hub id / local folder / registered test model)
and the trained tensors; the frontend settings come from the bundle too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from audio.features import AudioError, FbankConfig, features
from shared import peft


def frontend_config(meta: dict, where: str = "adapter.json") -> FbankConfig:
    pre = dict(meta.get("preprocessing") or {})
    frontend = pre.pop("frontend", None)
    if frontend != "fbank_ast":
        raise peft.BundleError(f"{where}: preprocessing.frontend is {frontend!r}; audio.predict needs a bundle "
                               f"trained on AST fbank features ('fbank_ast')")
    try:
        return FbankConfig(**pre)
    except TypeError as e:
        raise peft.BundleError(f"{where}: preprocessing has settings this version does not know ({e})") from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def predict(model, cfg: FbankConfig, paths: list[str], top_k: int = 5):
    model.eval()
    labels = model.labels or [str(i) for i in range(model.head.num_classes)]
    out = []
    for p in paths:
        x = features(p, cfg).unsqueeze(0)  # (1, T, F)
        with torch.inference_mode():
            probs = model(x).softmax(-1)[0]
        scores, idx = probs.topk(min(top_k, len(labels)))
        out.append((p, [(labels[i], s.item()) for s, i in zip(scores, idx.tolist())]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="adapter bundle folder (adapter.json + adapter.safetensors)")
    ap.add_argument("--top-k", type=positive_int, default=5)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    try:
        meta = peft.read_meta(args.adapter)
        cfg = frontend_config(meta, str(Path(args.adapter) / "adapter.json"))
        model = peft.from_bundle(args.adapter)
        results = predict(model, cfg, args.files, args.top_k)
    except (peft.BundleError, AudioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, top in results:
        print(path)
        for label, score in top:
            print(f"  {score:6.3f}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
