"""`python -m audio.predict --adapter runs/esc50/adapter clip.wav [...]`: top-k labels per file.

Loads only what the bundle names: its backbone (hub id / local folder / registered test model)
and the trained tensors; the frontend settings come from the bundle too.
"""
from __future__ import annotations

import argparse
import sys

import torch

from audio import backbone as _register_ast  # noqa: F401
from audio.features import AudioError, FbankConfig, features
from shared import peft


def frontend_config(meta: dict) -> FbankConfig:
    pre = dict(meta.get("preprocessing") or {})
    if pre.pop("frontend", None) != "fbank_ast":
        raise peft.BundleError("this bundle was not trained on AST fbank features (preprocessing.frontend)")
    return FbankConfig(**pre)


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
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    try:
        meta = peft.read_meta(args.adapter)
        cfg = frontend_config(meta)
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
