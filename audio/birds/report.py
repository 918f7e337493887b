"""`python -m audio.birds.report RUNS`: cmAP per test set with the probe kinds side by side.

Reads every `metrics.json` that `audio.probe` wrote under RUNS (method `<kind>_probe`), one row per
(test set, few-shot size, metric definition) and one column per probe kind (runs of other metric
definitions than BirdSet's, `definition` in metrics.json, get their own rows, named by it); writes `bird-report-<metric>.md` and a
grouped bar chart `bird-report-<metric>.png` into RUNS. (`python -m audio.report RUNS --metric
test/cmap` gives the generic table and the metric-vs-parameters plot.)
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from shared.fs import atomic_write
from shared.report import collect

KINDS = ("linear", "attentive", "prototypical")


def table(rows: list[dict], metric: str = "test/cmap") -> tuple[list[str], dict[str, dict[str, float]]]:
    """(row names, {row name: {kind: value}}); several runs of one cell are averaged."""
    cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    order: dict[str, tuple] = {}
    for r in rows:
        kind = str(r.get("method", "")).removesuffix("_probe")
        if kind not in KINDS or metric not in r:
            continue
        definition = r.get("definition") if isinstance(r.get("definition"), str) else "unrecorded"
        name = str(r.get("dataset")) + (f" ({r['few_shot']}-shot)" if r.get("few_shot") else "") + \
            ("" if definition == "reference" else f" [{definition}]")
        cells[name][kind].append(float(r[metric]))
        order[name] = (str(r.get("dataset")), int(r.get("few_shot") or 0), definition)  # all data after its shots
    names = sorted(cells, key=lambda n: (order[n][0], order[n][2] != "reference", order[n][2], order[n][1] == 0,
                                         order[n][1]))
    return names, {n: {k: sum(v) / len(v) for k, v in cells[n].items()} for n in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m audio.birds.report", description=__doc__.splitlines()[0])
    ap.add_argument("runs", help="folder searched recursively for metrics.json")
    ap.add_argument("--metric", default="test/cmap")
    args = ap.parse_args(argv)
    root = Path(args.runs)
    names, values = table(collect(root), args.metric)
    if not names:
        raise ValueError(f"{root}: no metrics.json written by audio.probe with {args.metric}")
    kinds = [k for k in KINDS if any(k in values[n] for n in names)]
    lines = [f"| test set | {' | '.join(kinds)} |", "|---|" + "---|" * len(kinds)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{100 * values[n][k]:.1f}" if k in values[n] else "-" for k in kinds) + " |")
    stem = "bird-report-" + args.metric.replace("/", "-")
    legend = ("metric definitions: BirdSet's metric code unless a row names another (`definition` in metrics.json; "
              "[unrecorded]: a run written before definitions were recorded; see docs/metrics.md)")
    atomic_write(root / f"{stem}.md", f"{args.metric} in %\n\n" + "\n".join(lines) + f"\n\n{legend}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 3.2))
    width = 0.8 / len(kinds)
    for j, k in enumerate(kinds):
        ax.bar([i + j * width for i in range(len(names))], [100 * values[n].get(k, float("nan")) for n in names],
               width=width, label=k)
    ax.set_xticks([i + width * (len(kinds) - 1) / 2 for i in range(len(names))], names, fontsize=8)
    ax.set_ylabel(f"{args.metric} (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / f"{stem}.png", dpi=110)
    plt.close(fig)
    print("\n".join(lines))
    print(f"written: {root / f'{stem}.md'}, {root / f'{stem}.png'}")
    return 0


if __name__ == "__main__":
    from shared.cli import friendly

    sys.exit(friendly(main))
