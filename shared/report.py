"""Results tables from run folders: every run writes `metrics.json`; this gathers them.

Rows are grouped by (dataset, method, few_shot); the metric is reported as mean +- std over
folds / seeds, beside the trainable parameter count. A plot of the metric against trainable
parameters per method (log scale) mirrors the PETL-AST paper's figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from shared.fs import atomic_path, atomic_write


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


def summarise(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if metric in r:
            groups[(r.get("dataset"), r.get("method"), r.get("few_shot"), r.get("backbone"),
                    r.get("trainable_params"))].append(r)
    out = []
    for (dataset, method, shots, _, _), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        vals = [r[metric] for r in rs]
        out.append({"dataset": dataset, "method": method, "few_shot": shots, "runs": len(rs),
                    "folds": sorted({r.get("fold") for r in rs if r.get("fold") is not None}),
                    "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "trainable_params": rs[0].get("trainable_params"),
                    "trainable_percent": 100.0 * rs[0].get("trainable_params", 0) / max(1, rs[0].get("total_params", 1))})
    return out


def markdown(summary: list[dict[str, Any]], metric: str) -> str:
    lines = [f"| dataset | method | shots | runs (folds) | {metric} (mean ± std) | trainable params | % of total |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        folds = ",".join(map(str, s["folds"])) or "-"
        lines.append(f"| {s['dataset']} | {s['method']} | {s['few_shot'] or 'all'} | {s['runs']} ({folds}) | "
                     f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} | {s['trainable_params']:,} | "
                     f"{s['trainable_percent']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        ax.errorbar(s["trainable_params"], 100 * s["mean"], yerr=100 * s["std"], fmt="o", capsize=3,
                    label=f"{s['dataset']}: {s['method']}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


def main(argv: list[str] | None = None, default_metric: str = "test/acc") -> str:
    ap = argparse.ArgumentParser(description="Summarise run folders into a Markdown table and a plot")
    ap.add_argument("runs", help="folder searched recursively for metrics.json")
    ap.add_argument("--metric", default=default_metric)
    ap.add_argument("--out", default=None, help="Markdown file (default: <runs>/report.md)")
    ap.add_argument("--plot", default=None, help="PNG file (default: <runs>/report.png)")
    args = ap.parse_args(argv)
    rows = collect(args.runs)
    if not rows:
        raise SystemExit(f"no metrics.json found under {args.runs}")
    summary = summarise(rows, args.metric)
    if not summary:
        raise SystemExit(f"no run under {args.runs} reports {args.metric!r}")
    table = markdown(summary, args.metric)
    out = Path(args.out or Path(args.runs) / "report.md")
    atomic_write(out, table)
    plot(summary, args.metric, Path(args.plot or Path(args.runs) / "report.png"))
    print(table)
    return table
