"""`python -m audio.predict --adapter runs/esc50/adapter clip.wav [...]`: top-k labels per file.

Loads only what the bundle names: its backbone (hub id / local folder / registered test model)
and the trained tensors; the frontend settings come from the bundle too. Files are predicted
--batch-size at a time, decoded by --workers processes meanwhile; each batch's results are printed
(in the order given) as soon as it is done. Files that cannot be used (unreadable, truncated,
silent, a folder) are reported one line each as they are read, and the others are still
predicted. The exit code is then 2.
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch

from audio.features import AudioError, FbankConfig, check_silence, read_audio
from shared import peft
from shared.cli import positive_int, print_top
from shared.hub import resolve_adapter
from shared.predict import (
    Loaded,
    add_arguments,
    default_batch_size,
    model_device,
    predict_batches,
    resolve,
    stacked,
    warn_line,
)

EPILOG = """\
output: per file, its path, then one line per class: "  <probability>  <label>" (softmax).
exit codes: 0 all files predicted; 2 a bad bundle or argument (nothing predicted), or at least one
file could not be used (the others were predicted; each bad file is named on stderr).
"""


def _frontends() -> dict:
    """preprocessing.frontend -> its config class: AST's fbank, Whisper's log-mel."""
    from audio.whisper import FRONTEND, WhisperMelConfig

    return {"fbank_ast": FbankConfig, FRONTEND: WhisperMelConfig}


def frontend_config(meta: dict, where: str = "adapter.json"):
    """The bundle's frontend settings (`FbankConfig` / `WhisperMelConfig`, each with `compute(wave)`);
    refuses, in one line, a bundle of another domain or task."""
    pre = dict(meta.get("preprocessing") or {})
    frontend = pre.pop("frontend", None)
    known = _frontends()
    if frontend not in known:
        other = " (a medical image bundle: use python -m medical.predict)" \
            if str(pre.get("pipeline", "")).startswith("medical.") else ""
        raise peft.BundleError(f"{where}: preprocessing.frontend is {frontend!r}; audio.predict needs a bundle "
                               f"trained on audio features ({', '.join(map(repr, known))}){other}")
    task = meta.get("task", "classification")
    if task != "classification" or not meta.get("head"):
        raise peft.BundleError(f"{where}: task {task!r} without a classification head; audio.predict needs a "
                               f"classification bundle from audio.train")
    try:
        return known[frontend](**pre)
    except (TypeError, ValueError) as e:
        raise peft.BundleError(f"{where}: preprocessing has settings this version does not know ({e})") from None


def load_clip(path: str, cfg: FbankConfig, allow_truncated: bool = False, allow_silent: bool = False) -> Loaded:
    """One file's model input, (T, F) (Whisper: (F, T)); both frontends pad / trim every clip to
    the bundle's frames, so clips of any length stack into one batch. Raises `AudioError` naming
    the file; a silent file allowed by `allow_silent` carries its warning."""
    wave = read_audio(path, cfg.sample_rate, allow_truncated)
    silent = check_silence(wave, str(path), allow_silent, hint=" (pass --allow-silent to predict it anyway)")
    return Loaded(cfg.compute(wave, source=str(path)), warnings=(silent,) if silent else ())


def iter_predict(model, cfg: FbankConfig, paths: list[str], top_k: int = 5, allow_truncated: bool = False,
                 allow_silent: bool = False, warn=None, batch_size: int | None = None, workers: int = 0):
    """Yield, in the order given, (file, [(label, probability), ...]) per file, `batch_size` files
    per forward (default 16 on the CPU) decoded by `workers` processes (0: here), as each batch is
    done; a file that cannot be used yields its `AudioError` as soon as it is read. A silent file
    (`audio.features.check_silence`) is an error unless `allow_silent`: then it is predicted and
    `warn(message)` is called first (default: one `warning:` line on stderr)."""
    model.eval()
    labels = model.labels or [str(i) for i in range(model.head.num_classes)]
    k = min(top_k, len(labels))

    def run(xs: list[torch.Tensor]) -> list:
        with torch.inference_mode():
            probs = stacked(xs, lambda x: model(x).softmax(-1))
        out = []
        for p in probs:
            scores, idx = p.topk(k)
            out.append([(labels[i], s) for s, i in zip(scores.tolist(), idx.tolist())])
        return out

    load = functools.partial(load_clip, cfg=cfg, allow_truncated=allow_truncated, allow_silent=allow_silent)
    yield from predict_batches(paths, load, run, batch_size=batch_size or default_batch_size(model_device(model)),
                               workers=workers, errors=(AudioError,), warn=warn or warn_line)


def predict(model, cfg: FbankConfig, paths: list[str], top_k: int = 5, errors: list[str] | None = None,
            allow_truncated: bool = False, allow_silent: bool = False, batch_size: int | None = None,
            workers: int = 0):
    """[(file, [(label, probability), ...])] for the files that could be used; the others' messages
    go to `errors` (raised when `errors` is None)."""
    out = []
    for item in iter_predict(model, cfg, paths, top_k, allow_truncated, allow_silent, batch_size=batch_size,
                             workers=workers):
        if isinstance(item, AudioError):
            if errors is None:
                raise item
            errors.append(str(item))
        else:
            out.append(item)
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
    ap.add_argument("--allow-silent", action="store_true",
                    help="predict a silent file (every sample below 1e-4) with a warning instead of refusing it")
    add_arguments(ap)
    ap.add_argument("files", nargs="+", metavar="FILE",
                    help="audio files libsndfile reads (wav, flac, ogg, ...; any rate and channel count)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    errors: list[str] = []

    def results():
        adapter = resolve_adapter(args.adapter)  # a folder, catalogue name or reference; a typo names the closest
        meta = peft.read_meta(adapter)
        cfg = frontend_config(meta, f"{args.adapter} (adapter.json)")
        model = peft.from_bundle(adapter)
        batch_size, workers = resolve(args, model)
        yield from iter_predict(model, cfg, args.files, args.top_k, args.allow_truncated, args.allow_silent,
                                batch_size=batch_size, workers=workers)

    return print_top(results(), errors, (peft.BundleError, AudioError))

if __name__ == "__main__":
    sys.exit(main())
