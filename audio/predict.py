"""`python -m audio.predict --adapter runs/esc50/adapter clip.wav [...]`: top-k labels per file.

Loads only what the bundle names: its backbone (hub id / local folder / registered test model)
and the trained tensors; the frontend settings come from the bundle too. Files that cannot be
used (unreadable, truncated, a folder) are reported one line each and the others are still
predicted; the exit code is then 2.
"""
from __future__ import annotations

import argparse
import sys

import torch

from audio.features import AudioError, FbankConfig, features
from shared import peft
from shared.cli import positive_int, print_top

EPILOG = """\
output: per file, its path, then one line per class: "  <probability>  <label>" (softmax).
exit codes: 0 all files predicted; 2 a bad bundle or argument (nothing predicted), or at least one
file could not be used (the others were predicted; each bad file is named on stderr).
"""


def frontend_config(meta: dict, where: str = "adapter.json") -> FbankConfig:
    """The bundle's fbank settings; refuses, in one line, a bundle of another domain or task."""
    pre = dict(meta.get("preprocessing") or {})
    frontend = pre.pop("frontend", None)
    if frontend != "fbank_ast":
        other = " (a medical image bundle: use python -m medical.predict)" \
            if str(pre.get("pipeline", "")).startswith("medical.") else ""
        raise peft.BundleError(f"{where}: preprocessing.frontend is {frontend!r}; audio.predict needs a bundle "
                               f"trained on AST fbank features ('fbank_ast'){other}")
    task = meta.get("task", "classification")
    if task != "classification" or not meta.get("head"):
        raise peft.BundleError(f"{where}: task {task!r} without a classification head; audio.predict needs a "
                               f"classification bundle from audio.train")
    try:
        return FbankConfig(**pre)
    except TypeError as e:
        raise peft.BundleError(f"{where}: preprocessing has settings this version does not know ({e})") from None


def predict(model, cfg: FbankConfig, paths: list[str], top_k: int = 5, errors: list[str] | None = None,
            allow_truncated: bool = False):
    """[(file, [(label, probability), ...])] for the files that could be used; the others' messages
    go to `errors` (raised when `errors` is None)."""
    model.eval()
    labels = model.labels or [str(i) for i in range(model.head.num_classes)]
    out = []
    for p in paths:
        try:
            x = features(p, cfg, allow_truncated=allow_truncated).unsqueeze(0)  # (1, T, F)
        except AudioError as e:
            if errors is None:
                raise
            errors.append(str(e))
            continue
        with torch.inference_mode():
            probs = model(x).softmax(-1)[0]
        scores, idx = probs.topk(min(top_k, len(labels)))
        out.append((p, [(labels[i], s.item()) for s, i in zip(scores, idx.tolist())]))
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m audio.predict", description=__doc__.split("\n\n")[1],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, metavar="BUNDLE",
                    help="bundle written by audio.train: a folder (adapter.json + adapter.safetensors), a "
                         "catalogue name (python -m shared.hub list), hf://owner/name[@rev] or "
                         "https://.../bundle.zip#sha256=...")
    ap.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                    help="print the K most probable classes per file (default 5)")
    ap.add_argument("--allow-truncated", action="store_true",
                    help="use the samples present in a truncated file (its header declares more) instead of refusing it")
    ap.add_argument("files", nargs="+", metavar="FILE",
                    help="audio files libsndfile reads (wav, flac, ogg, ...; any rate and channel count)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    errors: list[str] = []

    def results():
        meta = peft.read_meta(args.adapter)
        cfg = frontend_config(meta, f"{args.adapter} (adapter.json)")
        model = peft.from_bundle(args.adapter)
        yield from predict(model, cfg, args.files, args.top_k, errors, args.allow_truncated)

    return print_top(results(), errors, (peft.BundleError, AudioError))

if __name__ == "__main__":
    sys.exit(main())
