"""Results tables from run folders: every run writes `metrics.json`; this gathers them.

Runs are averaged together only when their saved recipes (the `config` every `metrics.json`
holds) differ in nothing but the fold / seed; runs of different recipes (another learning rate,
epoch count, backbone ...) are separate rows, named by the recipe keys that tell them apart.
Each row shows the dataset, method, backbone, the runs it averages (by name) and the metric as
mean ± std over those runs. The std is the POPULATION std (divide by n, numpy's default), as
PETL-AST reports; with one run it is 0. Metrics in [0, 1] (accuracy, AUROC, Dice, ...) are shown
in %; others (HD95, losses, seconds) in their own units. Rows written before recipes were saved
(no `config`) are grouped on what they show: dataset, method, shots, backbone, protocol. Runs
whose metrics follow different definitions (`definition` in `metrics.json`: "reference" or the
named option, docs/metrics.md) are never averaged together, and the table names the definition.

A plot of the metric against trainable parameters (log scale) mirrors the PETL-AST paper's figure.
`main` writes `report-<metric>.md` and `report-<metric>.png` (e.g. `report-test-acc.md`), so
reports of two metrics sit side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from shared.fs import atomic_path, atomic_write

# Recipe keys that vary between the runs of one experiment (or do not change its results).
RUN_KEYS = {"seed_everything", "seed", "test_fold", "val_fold", "fold", "test_speakers", "val_speakers",
            "depth_cache_dir", "cache_dir", "num_workers",
            "enable_progress_bar", "enable_model_summary", "enable_checkpointing", "logger",
            "default_root_dir", "output_dir", "run_name", "accelerator", "devices"}
NOT_FRACTIONS = re.compile(r"loss|hd\d*|hausdorff|distance|seconds|time|epoch|step|volumes|count|params", re.I)


def collect(root: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    for p in sorted(Path(root).rglob("metrics.json")):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue  # staging folders of unfinished runs
        try:
            row = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: corrupt metrics file ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{p}: corrupt metrics file (expected a JSON object, got {type(row).__name__})")
        rows.append({**row, "_path": str(p)})
    return rows


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves (as JSON text, comparable)."""
    if not isinstance(d, dict):
        return {prefix: json.dumps(d, sort_keys=True, default=str)}
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def recipe_key(row: dict[str, Any]) -> tuple | None:
    """The saved recipe without its fold / seed (and bookkeeping) keys; None when the row has none."""
    cfg = row.get("config")
    if not isinstance(cfg, dict):
        return None
    return tuple(sorted((k, v) for k, v in flatten(cfg).items() if k.split(".")[-1] not in RUN_KEYS))


def summarise(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One entry per recipe (runs that differ only in fold / seed): mean and population std."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if metric in r and isinstance(r[metric], (int, float)):
            shown = (r.get("dataset"), r.get("method"), r.get("few_shot"), r.get("backbone"), r.get("protocol"),
                     r.get("definition") if isinstance(r.get("definition"), str) else None)
            groups[(shown, recipe_key(r))].append(r)
    out = []
    for (shown, recipe), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0][0])) + (str(kv[0][1]),)):
        vals = [float(r[metric]) for r in rs]
        trainable = sorted({r.get("trainable_params") for r in rs if r.get("trainable_params") is not None})
        total = rs[0].get("total_params") or 0
        out.append({"dataset": shown[0], "method": shown[1], "few_shot": shown[2], "backbone": shown[3],
                    "protocol": shown[4], "definition": shown[5], "runs": len(rs),
                    "run_names": sorted(str(r.get("run", "?")) for r in rs),
                    "folds": sorted({r.get("fold") for r in rs if r.get("fold") is not None}),
                    "mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                    "values": vals, "trainable_params": trainable[0] if len(trainable) == 1 else trainable or None,
                    "trainable_percent": (100.0 * max(trainable) / total) if trainable and total else None,
                    "recipe": dict(recipe) if recipe is not None else None,
                    "cpu_seconds": _mean_of(rs, "cpu_seconds"), "train_seconds": _mean_of(rs, "train_seconds"),
                    "unit": ((rs[0].get("units") or {}) if isinstance(rs[0].get("units"), dict) else {}).get(metric)})
    _name_variants(out)
    return out


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean of a numeric field over the runs that record it (None when none does)."""
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return statistics.fmean(vals) if vals else None


def _name_variants(summary: list[dict[str, Any]]) -> None:
    """`label`: dataset: method (backbone, shots), plus the recipe keys that differ between entries
    that would otherwise share a label (e.g. `lr=0.003, max_epochs=20`), so every label is unique."""
    def base(s):
        extra = [str(s["backbone"])] + ([f"{s['few_shot']}-shot"] if s["few_shot"] else [])
        return f"{s['dataset']}: {s['method']} ({', '.join(extra)})"

    by_base: dict[str, list[dict]] = defaultdict(list)
    for s in summary:
        by_base[base(s)].append(s)
    for label, group in by_base.items():
        if len(group) == 1:
            group[0]["label"], group[0]["variant"] = label, ""
            continue
        recipes = [s["recipe"] or {} for s in group]
        keys = sorted({k for r in recipes for k in r if len({r2.get(k) for r2 in recipes}) > 1})
        for i, s in enumerate(group):
            r = recipes[i]
            diff = ", ".join(f"{k.split('.')[-1]}={json.loads(r[k]) if k in r else '-'}" for k in keys)
            s["variant"] = diff or f"variant {i + 1}"
            proto = f"{s['protocol']}; " if s["protocol"] and len({g["protocol"] for g in group}) > 1 else ""
            s["label"] = f"{label} [{proto}{s['variant']}]"


def is_fraction(metric: str, summary: list[dict[str, Any]]) -> bool:
    """Shown in %: a metric whose name is not a distance / loss / time and whose values lie in [0, 1]."""
    values = [v for s in summary for v in s.get("values", [s["mean"]])]
    return not NOT_FRACTIONS.search(metric.split("/")[-1]) and all(0.0 <= v <= 1.0 for v in values)


def _params(s: dict[str, Any]) -> str:
    t = s["trainable_params"]
    if t is None:
        return "-"
    return f"{t:,}" if isinstance(t, int) else f"{min(t):,}-{max(t):,}"


def markdown(summary: list[dict[str, Any]], metric: str, columns=None) -> str:
    """The table. `columns`: extra [(header, cell(entry) -> str)] placed before the run names."""
    columns = list(columns or [])
    pct = is_fraction(metric, summary)
    scale = 100.0 if pct else 1.0
    units = sorted({s["unit"] for s in summary if s.get("unit")})
    unit = " %" if pct else f" ({', '.join(units)})" if units else ""
    protocol = any(s.get("protocol") for s in summary)
    definition = any(s.get("definition") for s in summary)
    variant = any(s.get("variant") for s in summary)
    cpu = any(s.get("cpu_seconds") is not None for s in summary)
    head = ["dataset", "method", "backbone", "shots"] + (["protocol"] if protocol else []) + \
        (["metric definition"] if definition else []) + (["recipe"] if variant else []) + \
        ["runs (folds)", f"{metric}{unit} (mean ± std)", "trainable params", "% of total"] + \
        (["CPU s per run"] if cpu else []) + [h for h, _ in columns] + ["run names"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        folds = ",".join(map(str, s["folds"])) or "-"
        cells = [str(s["dataset"]), str(s["method"]), str(s.get("backbone")), str(s["few_shot"] or "all")]
        cells += [str(s.get("protocol") or "-")] if protocol else []
        cells += [str(s.get("definition") or "-")] if definition else []
        cells += [s.get("variant") or "-"] if variant else []
        cells += [f"{s['runs']} ({folds})", f"{scale * s['mean']:.2f} ± {scale * s['std']:.2f}", _params(s),
                  f"{s['trainable_percent']:.3f}" if s.get("trainable_percent") is not None else "-"]
        cells += [f"{s['cpu_seconds']:.0f}" if s.get("cpu_seconds") is not None else "-"] if cpu else []
        cells += [cell(s) for _, cell in columns] + [", ".join(s.get("run_names", []))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"std: population std over the runs of a row (divide by n; PETL-AST reports the same); "
                 f"rows average only runs whose saved recipes differ in fold / seed alone."
                 + (" Values in %." if pct else "")
                 + (" CPU s per run: the mean over a row's runs of the training process's CPU time (all its "
                    "threads) for fit + test (`cpu_seconds` in metrics.json)." if cpu else ""))
    return "\n".join(lines) + "\n"


def runs_text(n: int) -> str:
    return "1 run" if n == 1 else f"{n} runs"


def _legend_label(s: dict[str, Any], short: bool) -> str:
    """The row's label; with many rows only its method (and recipe variant), to keep the legend narrow."""
    if short:
        return str(s["method"]) + (f" [{s['variant']}]" if s.get("variant") else "")
    return s.get("label") or f"{s['dataset']}: {s['method']}"


def figure(summary: list[dict[str, Any]], metric: str):
    """The metric against trainable parameters (a matplotlib Figure, Agg): one marker per row of the
    table, labelled beside it with its method and "1 run" / "n runs"; a row of several runs is its
    mean with a ± std bar, a single run a hollow marker (no spread to show). Axes carry units: the
    parameter count on a log scale, the metric in % (fractions) or its recorded unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pct = is_fraction(metric, summary)
    scale = 100.0 if pct else 1.0
    units = sorted({s["unit"] for s in summary if s.get("unit")})
    many = len(summary) > 6  # then the legend goes beside the axes and names the points (no labels on them)
    fig, ax = plt.subplots(figsize=(11, 5.5) if many else (8, 5), layout="constrained")
    colours = plt.get_cmap("tab20" if len(summary) > 10 else "tab10")
    markers = "osD^vP*Xhp<>"
    drawn, skipped, xs, ys, levels = 0, 0, [], [], []
    for i, s in enumerate(summary):
        t = s["trainable_params"]
        x = t if isinstance(t, int) else (max(t) if t else None)
        if x is None:
            skipped += 1
            continue
        if x == 0:  # nothing trained (a zero-shot baseline): no place on a log axis, a level line instead
            col = colours(i % colours.N)
            label = _legend_label(s, many)
            ax.axhline(scale * s["mean"], color=col, linestyle="--", linewidth=1.2,
                       label=f"{label}: 0 trained, {runs_text(s['runs'])}" + (", mean" if s["runs"] > 1 else ""))
            drawn, levels = drawn + 1, levels + [scale * s["mean"]]
            continue
        x, y, col = max(1, x), scale * s["mean"], colours(i % colours.N)
        label = _legend_label(s, many)
        if s["runs"] > 1:
            ax.errorbar(x, y, yerr=scale * s["std"], fmt=markers[i % len(markers)] if many else "o", capsize=4,
                        color=col, label=f"{label}: {runs_text(s['runs'])}, mean ± std")
        else:
            ax.plot([x], [y], marker="D", markersize=8, markerfacecolor="white", markeredgecolor=col,
                    markeredgewidth=1.8, linestyle="none", label=f"{label}: 1 run")
        if not many:
            ax.annotate(f"{s['method']} ({runs_text(s['runs'])})", (x, y), xytext=(7, 6 if drawn % 2 == 0 else -12),
                        textcoords="offset points", fontsize=7, color=col)
        drawn, xs, ys = drawn + 1, xs + [x], ys + [y]
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.12)  # room for the labels beside the outermost markers
    if xs and min(xs) == max(xs):  # one parameter count: a decade either side, not matplotlib's sliver
        ax.set_xlim(xs[0] / 10, xs[0] * 10)
    if ys and max(ys) - min(ys) < 1e-9:
        pad = 0.1 * abs(ys[0]) or 1.0
        ax.set_ylim(ys[0] - pad, ys[0] + pad)
    if levels:  # the level lines inside the axis, with the margin the markers get
        lo, hi = ax.get_ylim()
        pad = 0.05 * (max(hi, *levels) - min(lo, *levels))
        ax.set_ylim(min(lo, min(levels) - pad), max(hi, max(levels) + pad))
    if pct and max(ys + levels, default=0.0) <= 100.0 and ax.get_ylim()[1] > 101.0:
        ax.set_ylim(top=101.0)  # a ± std bar past 100 % is cut at the axis: accuracy stops at 100 %
    ax.set_xlabel("trainable parameters (count, log scale)")
    ax.set_ylabel(f"{metric} (%)" if pct else f"{metric} ({', '.join(units)})" if units else metric)
    total = sum(s["runs"] for s in summary)
    ax.set_title(f"{metric} against trainable parameters: {drawn} row(s) of the table, {runs_text(total)}"
                 + (f" ({skipped} without a parameter count not drawn)" if skipped else ""), fontsize=9)
    ax.grid(alpha=0.3)
    if drawn and many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    elif drawn:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no row records its trainable parameters", ha="center", va="center", transform=ax.transAxes)
    return fig


def plot(summary: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Write `figure(summary, metric)` to `path` (atomically; the format from its suffix)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = figure(summary, metric)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def slug(metric: str) -> str:
    """test/acc -> test-acc (file-name safe)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", metric).strip("-") or "metric"


def main(argv: list[str] | None = None, default_metric: str = "test/acc", columns=None) -> str:
    ap = argparse.ArgumentParser(description="Summarise run folders into a Markdown table and a plot")
    ap.add_argument("runs", help="folder searched recursively for metrics.json")
    ap.add_argument("--metric", default=default_metric)
    ap.add_argument("--out", default=None, help="Markdown file (default: <runs>/report-<metric>.md)")
    ap.add_argument("--plot", default=None, help="PNG file (default: <runs>/report-<metric>.png)")
    args = ap.parse_args(argv)
    rows = collect(args.runs)
    if not rows:
        raise SystemExit(f"no metrics.json found under {args.runs}")
    summary = summarise(rows, args.metric)
    if not summary:
        metrics = sorted({k for r in rows for k, v in r.items() if "/" in k and isinstance(v, (int, float))})
        raise SystemExit(f"no run under {args.runs} reports {args.metric!r} (they report: {', '.join(metrics) or 'nothing'})")
    table = markdown(summary, args.metric, columns=columns(summary) if callable(columns) else columns)
    out = Path(args.out or Path(args.runs) / f"report-{slug(args.metric)}.md")
    png = Path(args.plot or Path(args.runs) / f"report-{slug(args.metric)}.png")
    atomic_write(out, table)
    plot(summary, args.metric, png)
    print(table)
    print(f"report written to {out} and {png}")
    return table
