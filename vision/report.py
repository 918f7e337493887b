"""Results table, Delta_m vs trainable parameters plot, and the parameter counts of the paper's settings.

    python -m vision.report runs/vision_demo                 # table + plot from every metrics.json below it
    python -m vision.report runs/vision --baseline full      # Delta_m against single-task runs of method `full`
    python -m vision.report --counts                         # trainable parameters on the real Swin-T (4 tasks)

Delta_m of a run = mean over its tasks of (-1)^{lower-is-better} (M_t - M_single_t) / M_single_t (%),
where M_single_t is the mean over single-task runs of the baseline method on task t found in
the same folder whose metric on t has the same definition (metrics.json "definition"; runs
written before it was recorded used the previous variants): a table never mixes definitions. "trainable" counts the backbone-side method tensors plus every decoder; a
single-task method used for several tasks counts one copy per task (separate models).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.fs import atomic_write
from shared.report import collect

from .metrics import delta_m, run_definitions


def read_runs(root: Path) -> list[dict]:
    """The finished vision runs under `root` (staging folders of unfinished runs are skipped)."""
    return [r for r in collect(root) if {"tasks", "test", "params"} <= r.keys()]


def baselines(runs: list[dict], method: str) -> dict[tuple[str, str], float]:
    """{(task, metric definition): mean primary metric of the single-task runs of `method`}."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        if len(r["tasks"]) == 1 and r["method"] == method:
            t = r["tasks"][0]
            acc.setdefault((t, run_definitions(r)[t]), []).append(r["test"][t][r["primary"][t]])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def definition_label(defs: dict[str, str]) -> str:
    names = set(defs.values())
    return names.pop() if len(names) == 1 else ", ".join(f"{t}: {d}" for t, d in defs.items())


def table(runs: list[dict], base: dict[tuple[str, str], float], baseline: str) -> tuple[str, list[tuple[str, int, float]]]:
    tasks = sorted({t for r in runs for t in r["tasks"]})
    metric = {t: next(r["primary"][t] for r in runs if t in r["tasks"]) for t in tasks}
    head = ["run", "method", "tasks", "trainable", *[f"{t} {metric[t]}" for t in tasks], "metric definition",
            f"Delta_m vs single-task {baseline} (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    points = []
    for r in sorted(runs, key=lambda r: (len(r["tasks"]), r["run_name"])):
        res = {t: r["test"][t][r["primary"][t]] for t in r["tasks"]}
        defs = run_definitions(r)
        single = {t: base[(t, defs[t])] for t in r["tasks"] if (t, defs[t]) in base}
        try:
            dm = delta_m(res, single, r["lower_is_better"]) if set(res) <= set(single) else None
        except ValueError:  # a baseline of 0
            dm = None
        cells = [r["run_name"], r["method"], str(len(r["tasks"])), f"{r['params']['trainable']:,}"]
        cells += [f"{res[t]:.4f}" if t in res else "" for t in tasks]
        cells.append(definition_label(defs))
        cells.append(f"{dm:+.2f}" if dm is not None else "n/a (no baseline with the same metric definition, or a baseline of 0)")
        lines.append("| " + " | ".join(cells) + " |")
        if dm is not None and len(r["tasks"]) > 1:
            points.append((r["method"], r["params"]["trainable"], dm))
    return "\n".join(lines), points


def figure(points, baseline: str | None = None):
    """Delta_m against trainable parameters (a matplotlib Figure, Agg), one marker per method (and
    parameter count): the mean with a ± std bar over its runs, or a hollow marker labelled "1 run"
    for a single one; each marker labelled beside it; a zero line (no better or worse than the
    single-task baseline); axes with units."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, int], list[float]] = {}
    for name, n, dm in points:
        groups.setdefault((name, n), []).append(dm)
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    colours = plt.get_cmap("tab10")
    for i, ((name, n), dms) in enumerate(sorted(groups.items(), key=lambda kv: kv[0][1])):
        col, y = colours(i % 10), statistics.fmean(dms)
        runs = "1 run" if len(dms) == 1 else f"{len(dms)} runs"
        if len(dms) > 1:
            ax.errorbar(n, y, yerr=statistics.pstdev(dms), fmt="o", capsize=4, color=col,
                        label=f"{name} ({n:,} trainable): {runs}, mean ± std")
        else:
            ax.plot([n], [y], marker="D", markersize=8, markerfacecolor="white", markeredgecolor=col,
                    markeredgewidth=1.8, linestyle="none", label=f"{name} ({n:,} trainable): 1 run")
        ax.annotate(f"{name} ({runs}): {y:+.2f}%", (n, y), xytext=(7, 6 if i % 2 == 0 else -12),
                    textcoords="offset points", fontsize=7, color=col)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.15)
    xs = [n for _, n in groups]
    if xs and min(xs) == max(xs):
        ax.set_xlim(xs[0] / 10, xs[0] * 10)
    ax.axhline(0, color="grey", lw=0.8, ls="--", label="= the single-task baseline")
    ax.set_xlabel("trainable parameters (count, log scale: backbone methods + decoders)")
    ax.set_ylabel(f"Delta_m vs single-task {baseline or 'baseline'} (%)")
    total = sum(len(v) for v in groups.values())
    ax.set_title(f"multi-task runs: Delta_m against trainable parameters ({len(groups)} method(s), "
                 f"{'1 run' if total == 1 else f'{total} runs'})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot(points, path: Path, baseline: str | None = None) -> None:
    """Write `figure(points, baseline)` as a PNG at `path` (atomically)."""
    import matplotlib.pyplot as plt

    from shared.fs import atomic_path

    fig = figure(points, baseline)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


# --- parameter counts of the paper's settings -------------------------------------------------------
PAPER_TASKS = {"semseg": 21, "human_parts": 7, "saliency": None, "normals": None}  # PASCAL-Context, 4 tasks
RECIPES = Path(__file__).resolve().parents[1] / "domains" / "vision" / "methods"
# Polyhistor (Liu et al. 2022), Table 1: trainable parameters (M) on Swin-T / PASCAL-Context, decoders included,
# and its decoder-only row (the decoders every method trains); backbone-side = total - decoders.
PAPER_TOTAL_M = {"hyper_adapter": 72.77, "polyhistor": 8.96, "polyhistor_lite": 6.41}
PAPER_DECODERS_M = 1.94


def paper_backbone(method: str) -> int | None:
    """The paper's backbone-side trainable count of a method (None: not reported)."""
    m = PAPER_TOTAL_M.get(method)
    return round((m - PAPER_DECODERS_M) * 1e6) if m is not None else None


def recipe_methods(name: str) -> list[dict]:
    """`model.methods` of domains/vision/methods/<name>.yaml."""
    import yaml

    path = RECIPES / f"{name}.yaml"
    try:
        return yaml.safe_load(path.read_text())["model"]["methods"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read the recipe's model.methods ({e})") from None


# (label, recipe, methods, copies): copies = separate models (single-task methods), 1 = one shared model.
CONFIGS = [
    ("single-task full fine-tuning", None, [{"name": "full"}], 4),
    ("decoder-only (frozen backbone)", None, [], 1),
    ("BitFit", None, [{"name": "bitfit"}], 1),
    ("LoRA r4 on qkv (shared)", None, [{"name": "lora", "r": 4, "alpha": 8, "targets": ["qkv"]}], 1),
    ("single-task adapters (ffn, reduction 4)", None, [{"name": "adapter", "reduction": 4}], 4),
    ("shared adapter (ffn, reduction 4)", None, [{"name": "adapter", "reduction": 4}], 1),
    ("Compacter (phm 4, reduction 4)", None, [{"name": "compacter", "reduction": 4, "phm_dim": 4}], 1),
    ("HyperAdapter (hyperformer; recipe hyper_adapter)", "hyper_adapter", None, 1),
    ("Polyhistor (recipe polyhistor)", "polyhistor", None, 1),
    ("Polyhistor-Lite (recipe polyhistor_lite)", "polyhistor_lite", None, 1),
]


def meta_swin_t():
    """The real Swin-T architecture on the meta device (no weights, no download, nothing allocated)."""
    import timm
    import torch

    from .backbone import TIMM_NAME

    with torch.device("meta"):
        return timm.create_model(TIMM_NAME, pretrained=False, num_classes=0)


def backbone_count(methods: list[dict], num_tasks: int = len(PAPER_TASKS), base=None) -> int:
    """Backbone-side trainable parameters of `methods` on the real Swin-T (a copy of `base`, a
    `meta_swin_t()`, when given)."""
    import copy

    import torch

    from shared import peft
    from .model import resolve_methods

    bb = copy.deepcopy(base) if base is not None else meta_swin_t()
    with torch.device("meta"):
        peft.attach(bb, resolve_methods(methods, num_tasks), compute_fingerprint=False)
    return sum(peft.summary(bb)["by_method"].values())


def paper_counts(decoder_width: int = 64) -> list[tuple[str, int, int, int, int | None]]:
    """[(configuration, backbone-side trainable, decoders, total trainable, the paper's backbone-side
    count or None)] on the real Swin-T architecture."""
    from .backbone import stage_dims
    from .model import MLPDecoder
    from .tasks import make_task

    tasks = {t: make_task(t, n) for t, n in PAPER_TASKS.items()}
    base = meta_swin_t()
    dec = sum(MLPDecoder.count(stage_dims(base), t.channels, decoder_width) for t in tasks.values())
    out = []
    for label, recipe, methods, copies in CONFIGS:
        methods = recipe_methods(recipe) if recipe else methods
        backbone = backbone_count(methods, len(tasks) if copies == 1 else 1, base) * copies
        out.append((label, backbone, dec, backbone + dec, paper_backbone(methods[0]["name"]) if recipe else None))
    return out


def counts_table() -> str:
    lines = ["| configuration (Swin-T, PASCAL-Context 4 tasks) | backbone-side trainable | decoders | total | "
             "paper, backbone-side |", "|---|---:|---:|---:|---:|"]
    for label, b, d, t, paper in paper_counts():
        ref = f"{paper:,} ({100 * (b - paper) / paper:+.0f}%)" if paper else ""
        lines.append(f"| {label} | {b:,} | {d:,} | {t:,} | {ref} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vision.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", help="folder searched for metrics.json (runs of vision.train)")
    ap.add_argument("--baseline", default="full", help="method label of the single-task baseline runs (default: full)")
    ap.add_argument("--counts", action="store_true", help="print the parameter counts of the paper's configurations")
    a = ap.parse_args(argv)
    if not a.folder and not a.counts:
        ap.error("give a folder of runs and/or --counts")
    if a.folder:
        root = Path(a.folder)
        runs = read_runs(root) if root.is_dir() else []
        if not runs:
            print(f"error: {root}: no vision metrics.json found", file=sys.stderr)
            raise SystemExit(2)
        base = baselines(runs, a.baseline)
        text, points = table(runs, base, a.baseline)
        atomic_write(root / "report.md", text + "\n")
        print(text)
        if points:
            plot(points, root / "report.png", a.baseline)
        print(f"wrote {root / 'report.md'}" + (f" and {root / 'report.png'}" if points else ""))
    if a.counts:
        print(counts_table())


if __name__ == "__main__":
    main()
