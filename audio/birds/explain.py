"""`python -m audio.explain --adapter RUN/prototypical/adapter clip.wav`: "this looks like that".

For each predicted class of a prototypical probe: which of its prototypes fired, where in the
window (time x frequency) and how strongly (ReLU'd cosine similarity, its non-negative class weight
and their product, the prototype's share of the class logit). Prints the table and writes a PNG of
the window's spectrogram (frequency axis in Hz on the mel scale) with each firing prototype's
best-matching patch outlined and numbered as in the table (default runs/explain/explain_<clip>.png;
`--output` picks the file).

A Whisper-token probe (`domains/bioacoustic/fsdd_whisper.yaml`) has no frequency axis: its
prototypes live over time, so each firing prototype is a time span (one 20 ms token, or a cell of
the upsampled time axis) drawn across the whole (Whisper log-mel, 0-8 kHz) spectrogram, and the
table gives its time in seconds with no frequency column.

A clip longer than one 5 s window is scanned with sliding windows and the window with the most
confident prediction is explained (`--start SECONDS` picks one; it must be >= 0).

Evidence where the input holds nothing is flagged in the table, warned about (one line each) and
marked in the picture: a match in the padding after the clip's audio (a clip shorter than the
window, and the 5.0-5.12 s the 512 frames add to every 5 s window), and a match above the Nyquist
frequency of the file's own sample rate (an 8 kHz recording resampled to 32 kHz has no energy
above 4 kHz).
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

import torch

from audio.birds.frontend import BirdFbankConfig, clip_features, config_from_dict, duration_of, sliding_windows
from shared.heads import PrototypicalHead, Tokens

HOP_S = 0.010  # fbank hop
LOW_HZ = 20.0  # kaldi fbank's lowest filter edge (low_freq); the highest is the Nyquist of cfg.sample_rate
DEFAULT_DIR = Path("runs") / "explain"
PADDING, NYQUIST = "padding", "above Nyquist"


def similarity_maps(head: PrototypicalHead, tokens: Tokens, eps: float = 1e-8) -> torch.Tensor:
    """(B, C, P, H', W'): the head's own similarity maps (`PrototypicalHead.similarity_maps`)."""
    return head.similarity_maps(tokens, eps)


SCALES = ("kaldi", "slaney")  # kaldi's fbank (HTK mel, Bird-MAE); slaney mel (librosa / Whisper)


def hz_to_mel(hz: float, scale: str = "kaldi") -> float:
    if scale == "slaney":  # linear below 1 kHz (3 / 200 mel per Hz), logarithmic above
        return 3.0 * hz / 200.0 if hz < 1000.0 else 15.0 + 27.0 * math.log(hz / 1000.0) / math.log(6.4)
    return 2595.0 * math.log10(1 + hz / 700.0)


def mel_to_hz(m: float, scale: str = "kaldi") -> float:
    if scale == "slaney":
        return 200.0 * m / 3.0 if m < 15.0 else 1000.0 * math.exp((m - 15.0) * math.log(6.4) / 27.0)
    return 700.0 * (10 ** (m / 2595.0) - 1.0)


def mel_bin_edges_hz(n_bins: int = 128, low: float = LOW_HZ, high: float = 16_000.0) -> list[float]:
    """kaldi's mel filterbank: n_bins triangles equally spaced on the mel scale from low to high;
    bin i spans the edges i .. i + 2 of n_bins + 2 points. Returns the lower edge of each bin + the top."""
    lo, hi = hz_to_mel(low), hz_to_mel(high)
    pts = [mel_to_hz(lo + (hi - lo) * i / (n_bins + 1)) for i in range(n_bins + 2)]
    return pts[:n_bins] + [pts[-1]]


def bin_to_hz(position: float, n_bins: int = 128, low: float = LOW_HZ, high: float = 16_000.0,
              scale: str = "kaldi") -> float:
    """The frequency at a position on the picture's mel-bin axis, where pixel row i spans [i, i + 1)
    and its centre i + 0.5 is bin i's centre (mel point i + 1 of the n_bins + 2 equally spaced on
    the mel `scale`: kaldi's fbank, or the slaney filters of Whisper's log-mel)."""
    lo, hi = hz_to_mel(low, scale), hz_to_mel(high, scale)
    return mel_to_hz(lo + (hi - lo) * (position + 0.5) / (n_bins + 1), scale)


def hz_to_bin(hz: float, n_bins: int = 128, low: float = LOW_HZ, high: float = 16_000.0, scale: str = "kaldi") -> float:
    """`bin_to_hz` inverted: the position of `hz` on the mel-bin axis."""
    lo, hi = hz_to_mel(low, scale), hz_to_mel(high, scale)
    return (hz_to_mel(hz, scale) - lo) / (hi - lo) * (n_bins + 1) - 0.5


def explain(clf, x: torch.Tensor, labels: list[str], threshold: float = 0.5, top_prototypes: int = 3,
            window_start: float = 0.0, patch: int | None = None, frontend: BirdFbankConfig | None = None,
            audio_s: float | None = None, nyquist: float | None = None) -> list[dict]:
    """Rows of the explanation for one window x (the frontend's model input: (1, frames, mels) for
    Bird-MAE, (mels, frames) for Whisper): one row per (predicted class, firing prototype), sorted by
    class then contribution. A class is predicted when its probability is >= threshold; with none
    above it, the most probable class is explained.

    A map cell spans frames / H' frames and mels / W' mel bins (`patch`, when given: the patch size,
    divided by the upsampling). A time-only map (W' = 1: Whisper tokens) gives time spans: the
    rows' `mel_bins` and `hz` are None.

    Each row's `flags` name evidence where the input has nothing: PADDING when the matched cell's
    centre lies after the window's first `audio_s` seconds of audio, NYQUIST when more than half of its
    band (in Hz) lies above `nyquist` (half the file's own sample rate; never for a time span, which
    covers every frequency)."""
    cfg = frontend or BirdFbankConfig()
    n_bins, high = cfg.num_mel_bins, cfg.sample_rate / 2
    scale, low = getattr(cfg, "frequency_scale", "kaldi"), getattr(cfg, "low_hz", LOW_HZ)
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
    time_only = maps.shape[-1] == 1
    n_frames = cfg.spectrogram(x).shape[-1] if hasattr(cfg, "spectrogram") else x.shape[-2]
    if patch is not None:
        cell_t = cell_f = patch / head.upsample  # frames / mel bins per upsampled cell
    else:
        cell_t, cell_f = n_frames / maps.shape[-2], n_bins / maps.shape[-1]
    audio_end = window_start + audio_s if audio_s is not None else None
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
            t0, t1 = window_start + ti * cell_t * HOP_S, window_start + (ti + 1) * cell_t * HOP_S
            flags = []
            if audio_end is not None and (t0 + t1) / 2 > audio_end + 1e-9:
                flags.append(PADDING)
            if time_only:  # a time span: every frequency
                mel_bins = hz = None
            else:
                f0, f1 = int(fi * cell_f), int(min((fi + 1) * cell_f, n_bins))
                hz0, hz1 = bin_to_hz(f0, n_bins, low, high, scale), bin_to_hz(f1, n_bins, low, high, scale)
                mel_bins, hz = (f0, f1), (round(hz0), round(hz1))
                if nyquist is not None and (hz0 + hz1) / 2 > nyquist:
                    flags.append(NYQUIST)
            rows.append({"class": labels[c], "probability": float(probs[c]), "prototype": c * head.prototypes_per_class + p,
                         "similarity": float(sims[p]), "weight": float(weights[c, p]), "contribution": float(contrib[p]),
                         "share": float(contrib[p]) / total if total > 0 else 0.0,
                         "t_start": t0, "t_end": t1, "mel_bins": mel_bins, "hz": hz,
                         "cell": (ti, fi), "flags": flags})
    return rows


def flag_text(flags: list[str], nyquist: float | None = None) -> str:
    words = {PADDING: "in the padding (no audio)",
             NYQUIST: f"above the input's Nyquist ({nyquist:g} Hz): no energy" if nyquist else "above the input's Nyquist"}
    return "; ".join(words[f] for f in flags)


def warnings_for(rows: list[dict], audio_end: float | None, window_end: float, nyquist: float | None,
                 source_rate: int | None) -> list[str]:
    """One line per kind of evidence that lies where the input holds nothing (none: [])."""
    out = []
    pad = [i + 1 for i, r in enumerate(rows) if PADDING in r["flags"]]
    if pad:
        out.append(f"warning: row(s) {', '.join(map(str, pad))} place evidence in the padding after the clip's audio "
                   f"({audio_end:.2f}-{window_end:.2f} s of this window hold no sound): the probe matched padding, "
                   f"not a call")
    high = [i + 1 for i, r in enumerate(rows) if NYQUIST in r["flags"]]
    if high:
        out.append(f"warning: row(s) {', '.join(map(str, high))} place evidence above {nyquist:g} Hz, the Nyquist "
                   f"frequency of the {source_rate} Hz input (resampled to 32 kHz, it has no energy there)")
    return out


def is_time_only(rows: list[dict]) -> bool:
    """Rows of a probe without a frequency axis (time spans): `explain` leaves their `mel_bins` None."""
    return bool(rows) and all("mel_bins" in r and r["mel_bins"] is None for r in rows)


def table(rows: list[dict], nyquist: float | None = None, time_only: bool | None = None) -> str:
    """The rows as Markdown, numbered as the patches (time spans) in the picture; `note` flags evidence
    where the input holds nothing (`explain`'s flags). Time-only rows (Whisper tokens) have no
    frequency column, and their time to the millisecond (a token is 20 ms)."""
    time_only = is_time_only(rows) if time_only is None else time_only
    head = "| # | class | p | prototype | similarity | weight | contribution (share) | time (s) |"
    lines = [head + (" note |" if time_only else " frequency (Hz) | note |"),
             "|---|---|---|---|---|---|---|---|---|" + ("" if time_only else "---|")]
    for i, r in enumerate(rows, 1):
        when = f"{r['t_start']:.3f}-{r['t_end']:.3f}" if time_only else f"{r['t_start']:.2f}-{r['t_end']:.2f}"
        band = "" if time_only else f" {r['hz'][0]}-{r['hz'][1]} |"
        lines.append(f"| {i} | {r['class']} | {r['probability']:.2f} | #{r['prototype']} | {r['similarity']:.3f} | "
                     f"{r['weight']:.2f} | {r['contribution']:.3f} ({100 * r['share']:.0f}%) | {when} |{band} "
                     f"{flag_text(r.get('flags', []), nyquist) or '-'} |")
    return "\n".join(lines)


def hz_label(hz: float) -> str:
    return f"{hz / 1000:g}k" if hz >= 1000 else f"{hz:g}"


HZ_TICKS = (50, 100, 250, 500, 1000, 2000, 4000, 8000, 16000)


def figure(x: torch.Tensor, rows: list[dict], title: str, window_start: float = 0.0, audio_s: float | None = None,
           nyquist: float | None = None, frontend: BirdFbankConfig | None = None):
    """The explanation picture (a matplotlib Figure, Agg): the window's log-mel spectrogram with a colour
    bar, time in s, frequency in Hz (ticks at round frequencies, placed on the mel scale), each row's
    patch outlined in its class colour and numbered as in the table (a legend lists the numbers), the
    padding after the audio and the band above the input's Nyquist frequency shaded and labelled.
    Time-only rows (Whisper tokens) are time spans: a band across every frequency, its edges in the
    class colour, numbered at the top; the legend gives each span in seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cfg = frontend or BirdFbankConfig()
    n_bins, high = cfg.num_mel_bins, cfg.sample_rate / 2
    scale, low = getattr(cfg, "frequency_scale", "kaldi"), getattr(cfg, "low_hz", LOW_HZ)
    spec = (cfg.spectrogram(x) if hasattr(cfg, "spectrogram") else x[0].T).numpy()  # (mels, frames)
    time_only = is_time_only(rows)
    t_end = window_start + spec.shape[1] * HOP_S
    fig, ax = plt.subplots(figsize=(11, 4.2), layout="constrained")
    im = ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=(window_start, t_end, 0, spec.shape[0]))
    fig.colorbar(im, ax=ax, pad=0.01, label="log-mel energy (normalised)")
    ticks, last = [], -math.inf
    for hz in HZ_TICKS:  # round frequencies, at least 6 % of the axis apart (the low ones crowd on the mel scale)
        y = hz_to_bin(hz, n_bins, low, high, scale)
        if low < hz <= high and 0 <= y <= spec.shape[0] and y - last >= 0.06 * spec.shape[0]:
            ticks.append(hz)
            last = y
    ax.set_yticks([hz_to_bin(hz, n_bins, low, high, scale) for hz in ticks], [hz_label(hz) for hz in ticks])
    ax.set_ylabel("frequency (Hz, mel scale)")
    ax.set_xlabel("time (s)")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=11, steps=[1, 2, 2.5, 5, 10]))
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)

    extra = []  # legend entries of the shaded regions
    if audio_s is not None and window_start + audio_s < t_end - 1e-9:
        a = window_start + audio_s
        extra.append(ax.axvspan(a, t_end, facecolor="0.8", alpha=0.35, hatch="//", edgecolor="white", lw=0,
                                label="padding (no audio)"))
        ax.text((a + t_end) / 2, spec.shape[0] * 0.97, "padding", rotation=90 if t_end - a < 0.6 else 0,
                ha="center", va="top", fontsize=7, color="white")
    if nyquist is not None and nyquist < high:
        y = hz_to_bin(nyquist, n_bins, low, high, scale)
        extra.append(ax.axhspan(y, spec.shape[0], facecolor="0.8", alpha=0.35, hatch="\\\\", edgecolor="white", lw=0,
                                label=f"above the input's Nyquist ({hz_label(nyquist)} Hz): no energy"))
        ax.text(window_start + 0.02 * (t_end - window_start), (y + spec.shape[0]) / 2, f"> {hz_label(nyquist)} Hz: no input",
                va="center", fontsize=7, color="white")

    colours = plt.get_cmap("tab10")
    classes = list(dict.fromkeys(r["class"] for r in rows))
    handles, cells = [], {}
    for i, r in enumerate(rows, 1):
        col = colours(classes.index(r["class"]) % 10)
        flagged = bool(r.get("flags"))
        note = " [" + ", ".join(r["flags"]) + "]" if flagged else ""
        style = "--" if flagged else "-"
        if time_only:  # a time span over every frequency: a tinted band with edges in the class colour
            ax.axvspan(r["t_start"], r["t_end"], facecolor=col, alpha=0.25, lw=0)
            for t in (r["t_start"], r["t_end"]):
                ax.axvline(t, color=col, linewidth=0.8 + 1.5 * r["share"], linestyle=style)
            cells.setdefault((r["t_start"], spec.shape[0], spec.shape[0]), []).append((i, col))  # labels at the top
            where = f", {r['t_start']:.2f}-{r['t_end']:.2f} s"
        else:
            f0, f1 = r["mel_bins"]
            ax.add_patch(patches.Rectangle((r["t_start"], f0), r["t_end"] - r["t_start"], f1 - f0, fill=False,
                                           edgecolor=col, linewidth=1.2 + 2 * r["share"], linestyle=style))
            cells.setdefault((r["t_start"], f0, f1), []).append((i, col))
            where = ""
        handles.append(patches.Patch(facecolor=col if time_only else "none", alpha=0.5 if time_only else None,
                                     edgecolor=col, linestyle=style,
                                     label=f"{i}: {r['class']} #{r['prototype']}, sim {r['similarity']:.2f}, "
                                           f"{100 * r['share']:.0f}% of the class{where}{note}"))
    _number_patches(ax, cells, (window_start, t_end), spec.shape[0])
    ax.set_xlim(window_start, t_end)
    ax.set_ylim(0, spec.shape[0])
    title = "time span: class #prototype" if time_only else "patch: class #prototype"
    fig.legend(handles=handles + extra, loc="outside right upper", fontsize=7, title=title,
               title_fontsize=7, frameon=False)
    return fig


def _number_patches(ax, cells: dict, t_range: tuple[float, float], n_bins: int) -> None:
    """One label per outlined cell (the table numbers of the rows matching it), stacked upwards (or
    downwards at the top) where it would overlap a label already placed: no two labels overlap."""
    span = t_range[1] - t_range[0]
    placed: list[tuple[float, float, float, float]] = []  # (x0, y0, x1, y1) in data units
    h = 0.075 * n_bins
    for (t0, f0, f1), items in sorted(cells.items()):
        text = ",".join(str(i) for i, _ in items)
        w = (0.011 * len(text) + 0.012) * span
        y, step = f1 + 0.01 * n_bins, h
        if y + h > n_bins:
            y, step = f0 - h - 0.01 * n_bins, -h
        for _ in range(40):
            box = (t0, y, t0 + w, y + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
            y += step
            if y + h > n_bins or y < 0:  # out of room on that side: go the other way from the cell
                step = -step
                y = (f0 - h - 0.01 * n_bins) if step < 0 else (f1 + 0.01 * n_bins)
        placed.append(box)
        ax.text(t0, y, text, fontsize=7, color="black", va="bottom", ha="left",
                bbox={"boxstyle": "square,pad=0.15", "facecolor": items[0][1], "edgecolor": "none", "alpha": 0.9})


def plot(x: torch.Tensor, rows: list[dict], path: Path, title: str, window_start: float = 0.0,
         audio_s: float | None = None, nyquist: float | None = None, frontend: BirdFbankConfig | None = None) -> Path:
    """Write `figure(...)` as a PNG at `path` (atomically)."""
    import matplotlib.pyplot as plt

    from shared.fs import atomic_path

    fig = figure(x, rows, title, window_start, audio_s, nyquist, frontend)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def source_rate(path: Path) -> int:
    """The file's own sample rate (before resampling to 32 kHz)."""
    import soundfile as sf

    from audio.features import AudioError

    try:
        return int(sf.info(str(path)).samplerate)
    except Exception as e:
        raise AudioError(f"{path}: unreadable audio ({e})") from None


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
    ap.add_argument("--start", type=float, default=None, help="explain the 5 s window starting here (seconds, >= 0)")
    ap.add_argument("--threshold", type=float, default=0.5, help="probability at which a class counts as predicted")
    ap.add_argument("--top", type=int, default=3, help="prototypes shown per predicted class")
    ap.add_argument("--output", default=None,
                    help=f"PNG path (default: {DEFAULT_DIR}/explain_<clip name>.png)")
    args = ap.parse_args(argv)
    if args.start is not None and not (args.start >= 0 and math.isfinite(args.start)):
        raise ValueError(f"--start must be a time in the clip, >= 0 seconds; got {args.start:g}")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold is a probability in [0, 1]; got {args.threshold:g}")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1; got {args.top}")
    from shared import peft
    from shared.artifacts import read_meta, resolve

    meta = read_meta(resolve(args.adapter))
    if (meta.get("head") or {}).get("kind") != "prototypical":
        raise ValueError(f"{args.adapter}: not a prototypical probe bundle (head: {(meta.get('head') or {}).get('kind')}); "
                         f"use RUN/prototypical/adapter from python -m audio.probe")
    clf = peft.from_bundle(args.adapter).eval()
    cfg = config_from_dict(meta.get("preprocessing") or {})  # the frontend the probe was trained on
    path = Path(args.clip)
    if args.start is not None:
        s, e = args.start, min(args.start + cfg.window_s, duration_of(path))
        x = clip_features(path, s, e, cfg)
    else:
        s, e, x = best_window(clf, path, cfg)
    rate = source_rate(path)
    nyquist = rate / 2 if rate / 2 < cfg.sample_rate / 2 else None  # only an input below 32 kHz lacks a band
    audio_s = e - s
    rows = explain(clf, x, clf.labels or [str(i) for i in range(clf.head.num_classes)], args.threshold, args.top,
                   window_start=s, frontend=cfg, audio_s=audio_s, nyquist=nyquist)
    out = Path(args.output) if args.output else DEFAULT_DIR / f"explain_{path.stem}.png"
    window_end = s + cfg.spectrogram(x).shape[-1] * HOP_S
    title = (f"{path.name}, {s:.2f}-{window_end:.2f} s ({audio_s:.2f} s of audio, {rate} Hz): prototypes behind "
             + ", ".join(dict.fromkeys(r["class"] for r in rows)))
    if is_time_only(rows):
        title += " (time spans: the backbone's tokens are time steps, with no frequency axis)"
    plot(x, rows, out, title, s, audio_s, nyquist, cfg)
    print(f"{path} ({s:.2f}-{e:.2f} s of audio; the window's features span {s:.2f}-{window_end:.2f} s)")
    print(table(rows, nyquist))
    for line in warnings_for(rows, s + audio_s, window_end, nyquist, rate):
        print(line, file=sys.stderr)
    print(f"picture: {out}")
    return 0


if __name__ == "__main__":
    from shared.cli import friendly

    sys.exit(friendly(main))
