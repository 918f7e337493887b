"""`python -m audio.explain --adapter RUN/prototypical/adapter clip.wav`: "this looks like that".

For each predicted class of a prototypical probe: which of its prototypes fired, where in the
window (time x frequency) and how strongly (ReLU'd cosine similarity, its non-negative class weight
and their product, the prototype's share of the class logit). Prints the table and writes a PNG of
the window's spectrogram with each firing prototype's best-matching patch outlined.

A clip longer than one 5 s window is scanned with sliding windows and the window with the most
confident prediction is explained (`--start SECONDS` picks one).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from audio.birds.frontend import BirdFbankConfig, clip_features, duration_of, sliding_windows
from shared.heads import PrototypicalHead, Tokens

HOP_S = 0.010  # fbank hop


def similarity_maps(head: PrototypicalHead, tokens: Tokens, eps: float = 1e-8) -> torch.Tensor:
    """(B, C, P, H', W'): the head's own similarity maps (`PrototypicalHead.similarity_maps`)."""
    return head.similarity_maps(tokens, eps)


def mel_to_hz(m: float) -> float:
    return 700.0 * (10 ** (m / 2595.0) - 1.0)


def mel_bin_edges_hz(n_bins: int = 128, low: float = 20.0, high: float = 16_000.0) -> list[float]:
    """kaldi's mel filterbank: n_bins triangles equally spaced on the mel scale from low to high;
    bin i spans the edges i .. i + 2 of n_bins + 2 points. Returns the lower edge of each bin + the top."""
    lo, hi = 2595.0 * math.log10(1 + low / 700.0), 2595.0 * math.log10(1 + high / 700.0)
    pts = [mel_to_hz(lo + (hi - lo) * i / (n_bins + 1)) for i in range(n_bins + 2)]
    return pts[:n_bins] + [pts[-1]]


def explain(clf, x: torch.Tensor, labels: list[str], threshold: float = 0.5, top_prototypes: int = 3,
            window_start: float = 0.0, patch: int = 16) -> list[dict]:
    """Rows of the explanation for one window x (1, frames, mels): one row per (predicted class,
    firing prototype), sorted by class then contribution. A class is predicted when its probability
    is >= threshold; with none above it, the most probable class is explained."""
    head = clf.head
    if not isinstance(head, PrototypicalHead):
        raise ValueError(f"audio.explain needs a prototypical probe bundle, this one has a {getattr(head, 'kind', '?')} head")
    if getattr(head, "patch_layout", "grid") != "grid":  # Bird-MAE's reshape: map cells are not time x mel
        raise ValueError(f"audio.explain locates prototypes on the time x mel patch grid; this probe was trained "
                         f"with patch_layout {head.patch_layout!r} (Bird-MAE's reshape), whose map has no such axes")
    with torch.no_grad():
        tokens = clf.tokens(x[None])
        probs = head(tokens).sigmoid()[0]  # (C,)
        maps = similarity_maps(head, tokens)[0]  # (C, P, H', W'): H' = time, W' = mel
    weights = head.weight.detach().clamp(min=0)  # (C, P)
    predicted = [int(c) for c in torch.nonzero(probs >= threshold).flatten()] or [int(probs.argmax())]
    cell_t, cell_f = patch / head.upsample, patch / head.upsample  # frames / mel bins per upsampled cell
    edges = mel_bin_edges_hz()
    rows = []
    for c in sorted(predicted, key=lambda c: -float(probs[c])):
        sims = maps[c].flatten(1).amax(-1)  # (P,)
        contrib = sims * weights[c]
        total = float(contrib.sum())
        for p in contrib.argsort(descending=True)[:top_prototypes].tolist():
            if float(sims[p]) <= 0:
                continue
            flat = int(maps[c, p].flatten().argmax())
            ti, fi = divmod(flat, maps.shape[-1])
            f0, f1 = int(fi * cell_f), int(min((fi + 1) * cell_f, len(edges) - 1))
            rows.append({"class": labels[c], "probability": float(probs[c]), "prototype": c * head.prototypes_per_class + p,
                         "similarity": float(sims[p]), "weight": float(weights[c, p]), "contribution": float(contrib[p]),
                         "share": float(contrib[p]) / total if total > 0 else 0.0,
                         "t_start": window_start + ti * cell_t * HOP_S, "t_end": window_start + (ti + 1) * cell_t * HOP_S,
                         "mel_bins": (f0, f1), "hz": (round(edges[f0]), round(edges[f1])),
                         "cell": (ti, fi)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| class | p | prototype | similarity | weight | contribution (share) | time (s) | frequency (Hz) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['class']} | {r['probability']:.2f} | #{r['prototype']} | {r['similarity']:.3f} | "
                     f"{r['weight']:.2f} | {r['contribution']:.3f} ({100 * r['share']:.0f}%) | "
                     f"{r['t_start']:.2f}-{r['t_end']:.2f} | {r['hz'][0]}-{r['hz'][1]} |")
    return "\n".join(lines)


def plot(x: torch.Tensor, rows: list[dict], path: Path, title: str, window_start: float = 0.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    spec = x[0].T.numpy()  # (mels, frames)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.imshow(spec, origin="lower", aspect="auto", cmap="magma",
              extent=(window_start, window_start + spec.shape[1] * HOP_S, 0, spec.shape[0]))
    colours = plt.get_cmap("tab10")
    classes = list(dict.fromkeys(r["class"] for r in rows))
    for r in rows:
        col = colours(classes.index(r["class"]) % 10)
        f0, f1 = r["mel_bins"]
        ax.add_patch(patches.Rectangle((r["t_start"], f0), r["t_end"] - r["t_start"], f1 - f0, fill=False,
                                       edgecolor=col, linewidth=1.5 + 2 * r["share"]))
        ax.text(r["t_start"], f1 + 1, f"{r['class']} #{r['prototype']} {r['similarity']:.2f}", color=col, fontsize=7)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_window(clf, path: Path, cfg: BirdFbankConfig) -> tuple[float, float, torch.Tensor]:
    """(start, end, features) of the window of `path` with the most confident prediction."""
    dur = duration_of(path)
    if dur <= cfg.window_s:
        return 0.0, dur, clip_features(path, None, None, cfg)
    best = None
    for s, e in sliding_windows(dur, cfg.window_s, source=str(path)):
        x = clip_features(path, s, e, cfg)
        with torch.no_grad():
            p = float(clf(x[None]).sigmoid().max())
        if best is None or p > best[0]:
            best = (p, s, e, x)
    return best[1], best[2], best[3]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m audio.explain",
                                 description="Which prototypes of a prototypical probe fired, where and how strongly")
    ap.add_argument("--adapter", required=True, help="a prototypical probe bundle (RUN/prototypical/adapter)")
    ap.add_argument("clip", help="an audio file (any rate; longer clips: the most confident 5 s window)")
    ap.add_argument("--start", type=float, default=None, help="explain the 5 s window starting here (seconds)")
    ap.add_argument("--threshold", type=float, default=0.5, help="probability at which a class counts as predicted")
    ap.add_argument("--top", type=int, default=3, help="prototypes shown per predicted class")
    ap.add_argument("--output", default=None, help="PNG path (default: explain_<clip name>.png here)")
    args = ap.parse_args(argv)
    from shared import peft
    from shared.artifacts import read_meta, resolve

    meta = read_meta(resolve(args.adapter))
    if (meta.get("head") or {}).get("kind") != "prototypical":
        raise ValueError(f"{args.adapter}: not a prototypical probe bundle (head: {(meta.get('head') or {}).get('kind')}); "
                         f"use RUN/prototypical/adapter from python -m audio.probe")
    clf = peft.from_bundle(args.adapter).eval()
    cfg = BirdFbankConfig.from_dict(meta.get("preprocessing") or {})  # the frontend the probe was trained on
    path = Path(args.clip)
    if args.start is not None:
        s, e = args.start, args.start + cfg.window_s
        x = clip_features(path, s, min(e, duration_of(path)), cfg)
    else:
        s, e, x = best_window(clf, path, cfg)
    rows = explain(clf, x, clf.labels or [str(i) for i in range(clf.head.num_classes)], args.threshold, args.top,
                   window_start=s)
    out = Path(args.output or f"explain_{path.stem}.png")
    plot(x, rows, out, f"{path.name} {s:.1f}-{e:.1f} s: " + ", ".join(dict.fromkeys(r["class"] for r in rows)), s)
    print(f"{path} ({s:.1f}-{e:.1f} s)")
    print(table(rows))
    print(f"picture: {out}")
    return 0


if __name__ == "__main__":
    from shared.cli import friendly

    sys.exit(friendly(main))
