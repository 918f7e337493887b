#!/usr/bin/env python
"""CPU benchmark of the PEFT core: training-step time and peak memory per method, LoRA
inference before and after merging, and a linear-probe epoch on cached vs recomputed features.

    python benchmarks/peft_step.py --quick                   # depth-2 ViT-B width, ~45 s idle
    python benchmarks/peft_step.py --out benchmarks/results  # ViT-B/16, ~8 min on 2 cores

Results go to <out>/peft_step.json and <out>/peft_step.md (the table is also printed).
Every measurement runs in its own fresh process, forked from a multiprocessing forkserver
that has only imported the libraries, so one configuration's memory never counts for another.
Targets from the issue are printed beside the measured values; they are never tuned for.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/peft_step.py` without an installed checkout
    sys.path.insert(0, str(ROOT))

TARGETS = {"step_ratio_max": 0.70, "memory_ratio_max": 0.50, "merged_ratio_max": 1.02, "cache_speedup_min": 20.0}
NUM_CLASSES = 10
GIB = 2**30

# (key, label, PEFT method as a dict for shared.peft.from_dict, or None)
TRAIN_CONFIGS = [
    ("full", "full fine-tuning", None),
    ("linear_probe", "linear probe (no_grad backbone)", None),
    ("lora", "LoRA r8 a16 on qkv", {"name": "lora", "r": 8, "alpha": 16, "targets": ["qkv"]}),
    ("adapter", "adapter ffn parallel b64", {"name": "adapter", "placement": "ffn", "mode": "parallel",
                                             "bottleneck": 64}),
    ("prompt", "deep prompt, 10 tokens", {"name": "prompt", "n_tokens": 10, "deep": True}),
    ("bitfit", "BitFit", {"name": "bitfit"}),
]


def train_configs(depth: int) -> list[tuple[str, str, dict | None]]:
    """TRAIN_CONFIGS plus methods confined to the top half of the blocks: autograd then stops the
    backward at the lowest adapted block (nothing below it needs a gradient), the one idea here
    that reaches below the ~0.73x every all-blocks method pays for its input gradients."""
    top = list(range(depth // 2, depth))
    qkv = "|".join(str(i) for i in top)
    lora = {"name": "lora", "r": 8, "alpha": 16, "targets": ["qkv"]}
    adapter = {"name": "adapter", "placement": "ffn", "mode": "parallel", "bottleneck": 64}
    return TRAIN_CONFIGS + [
        # activation recomputation per block (shared.peft.recompute): memory for one extra forward
        ("full_recompute", "full fine-tuning + recompute", None),
        ("lora_recompute", "LoRA r8 a16 on qkv + recompute", lora),
        ("adapter_recompute", "adapter ffn parallel b64 + recompute", adapter),
        ("lora_top_half", f"LoRA r8 a16 on qkv of blocks {top[0]}-{top[-1]} only",
         {"name": "lora", "r": 8, "alpha": 16, "targets": rf"blocks\.({qkv})\.attn\.qkv"}),
        ("adapter_top_half", f"adapter ffn parallel b64 in blocks {top[0]}-{top[-1]} only",
         {"name": "adapter", "placement": "ffn", "mode": "parallel", "bottleneck": 64, "blocks": top}),
    ]


# ----------------------------------------------------------------------------- memory (Linux)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- child processes
def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch


def _backbone(spec: dict):
    import timm

    return timm.create_model(spec["backbone"], pretrained=False, num_classes=0, img_size=spec["img"],
                             **spec["backbone_kwargs"])


def _classifier(spec: dict, method: dict | None, frozen: bool, recompute: bool = False):
    from shared import heads, peft

    backbone = _backbone(spec)
    if method is not None:
        peft.attach(backbone, [method])
    elif frozen:
        backbone.requires_grad_(False)
    if recompute:
        peft.recompute(backbone)
    head = heads.LinearHead(backbone.num_features, NUM_CLASSES, pool="cls")
    return peft.Classifier(backbone, head)


def _versions() -> dict:
    import peft as hf_peft
    import timm
    import torch

    return {"torch": torch.__version__, "timm": timm.__version__, "hf_peft": hf_peft.__version__}


def run_train(spec: dict, key: str, method: dict | None) -> dict:
    """Median training step (forward + backward + AdamW) and peak RSS of one configuration."""
    peak_reset = _reset_peak()  # the forkserver's own peak is not this configuration's
    torch = _setup(spec["threads"])
    import gc

    import torch.nn.functional as F

    probe = key == "linear_probe"
    model = _classifier(spec, method, frozen=probe, recompute=key.endswith("_recompute"))
    model.train()
    x = torch.randn(spec["batch"], 3, spec["img"], spec["img"])  # (B, 3, H, W)
    y = torch.randint(0, NUM_CLASSES, (spec["batch"],))
    gc.collect()
    baseline_kib = _status_kib("VmRSS")  # model (and methods, head, one batch) loaded
    construct_peak_kib = _status_kib("VmHWM")
    peak_reset = _reset_peak() and peak_reset

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        if probe:
            with torch.no_grad():
                tokens = model.tokens(x)
            logits = model.head(tokens)  # (B, C)
        else:
            logits = model(x)
        F.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    steps_peak_kib = _status_kib("VmHWM")
    return {
        "key": key,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_all": times,
        "baseline_rss_gib": baseline_kib * 1024 / GIB,
        # whole-process peak: construction or training, whichever was higher
        "peak_rss_gib": max(construct_peak_kib, steps_peak_kib) * 1024 / GIB,
        "peak_above_baseline_gib": (steps_peak_kib - baseline_kib) * 1024 / GIB,
        "peak_reset_ok": peak_reset,
        "versions": _versions(),
    }


def run_inference(spec: dict) -> dict:
    """Eval forward of the bare backbone, unmerged LoRA and merged LoRA, timed interleaved."""
    torch = _setup(spec["threads"])
    from shared import peft
    from shared.backbones import anatomy

    def build(lora: bool, merged: bool):
        torch.manual_seed(0)  # the same backbone weights in all three
        m = _backbone(spec)
        if lora:
            peft.attach(m, [peft.LoRA(r=8, alpha=16, targets=("qkv",))], compute_fingerprint=False)
            torch.manual_seed(1)  # B is zero at init; a non-zero B makes the merge check meaningful
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)
            if merged:
                report = peft.merge(m)
                if set(report.values()) != {"merged"}:
                    raise RuntimeError(f"LoRA did not merge: {report}")
        return m.eval()

    models = {"bare": build(False, False), "lora_unmerged": build(True, False), "lora_merged": build(True, True)}
    fns = {k: anatomy(m).forward_tokens for k, m in models.items()}
    x = torch.randn(spec["batch"], 3, spec["img"], spec["img"])
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        outs = {k: fn(x).x for k, fn in fns.items()}  # warm-up, and the outputs for the merge check
        keys = list(models)
        for r in range(spec["infer_reps"]):
            for k in keys[r % 3:] + keys[:r % 3]:  # rotate the order so drift hits all three alike
                t0 = time.perf_counter()
                fns[k](x)
                times[k].append(time.perf_counter() - t0)
    diff = (outs["lora_merged"] - outs["lora_unmerged"]).abs().max().item()
    return {"times": times, "merged_max_abs_diff": diff, "versions": _versions()}


def run_probe(spec: dict) -> dict:
    """One linear-probe epoch with features recomputed per batch vs read from a FeatureCache."""
    torch = _setup(spec["threads"])
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from shared import peft
    from shared.data import FeatureCache, extract_features
    from shared.heads import Tokens

    model = _classifier(spec, None, frozen=True).eval()
    n, b = spec["probe_images"], spec["batch"]
    images = torch.randn(n, 3, spec["img"], spec["img"])  # (N, 3, H, W)
    labels = torch.randint(0, NUM_CLASSES, (n,))
    image_loader = DataLoader(TensorDataset(images, labels), batch_size=b)
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3)

    def train_batch(tokens, yb):
        F.cross_entropy(model.head(tokens), yb).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def recompute_epoch():
        for xb, yb in image_loader:
            with torch.no_grad():
                tokens = model.tokens(xb)
            train_batch(tokens, yb)

    with torch.no_grad():
        model.tokens(images[:b])  # warm-up forward, outside every timing
    t0 = time.perf_counter()
    recompute_epoch()
    recompute_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(root)
        t0 = time.perf_counter()
        key = FeatureCache.key(peft.fingerprint(model.backbone), {"img_size": spec["img"]},
                               {"dataset": "random", "n": n, "seed": 0}, extractor="tokens.pool(cls)")
        fingerprint_s = time.perf_counter() - t0
        feats = cache.get_or_compute(
            key, lambda: extract_features(lambda xb: model.tokens(xb).pool("cls"), image_loader))
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        feats = cache.get_or_compute(key, lambda: {})  # a hit: what every later run pays
        load_s = time.perf_counter() - t0
        if cache.misses != 1 or cache.hits != 1:
            raise RuntimeError(f"feature cache: expected 1 miss + 1 hit, got {cache.misses} + {cache.hits}")
    feature_loader = DataLoader(TensorDataset(feats["features"], feats["labels"]), batch_size=b)

    def cached_epoch():
        for fb, yb in feature_loader:  # fb: (B, D) pooled CLS features
            train_batch(Tokens(fb[:, None], num_prefix=1), yb)

    cached_epoch()  # warm-up
    times = []
    for _ in range(spec["probe_epochs"]):
        t0 = time.perf_counter()
        cached_epoch()
        times.append(time.perf_counter() - t0)
    return {"images": n, "recompute_epoch_s": recompute_s, "cache_fingerprint_s": fingerprint_s,
            "cache_fill_s": fill_s, "cache_load_s": load_s, "cached_epoch_s": statistics.median(times),
            "cached_epoch_s_min": min(times), "cached_epoch_s_all": times, "versions": _versions()}


def _run_isolated(pool_ctx, fn, *args):
    """Run fn(*args) in a fresh process forked from the (pre-imported) forkserver."""
    with ProcessPoolExecutor(max_workers=1, mp_context=pool_ctx, max_tasks_per_child=1) as ex:
        return ex.submit(fn, *args).result()


# ----------------------------------------------------------------------------- report
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None  # None: the reference is zero (tiny models may not grow RSS at all)


def _sec(v: float) -> str:
    return f"{v:.4g}"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _meets(v: float | None, limit: float, below: bool = True) -> str:
    if v is None:
        return "n/a"
    ok = v <= limit if below else v >= limit
    return f"{_x(v)} ({'yes' if ok else 'no'})"


def render_markdown(res: dict) -> str:
    c = res["config"]
    t = res["targets"]
    lines = [
        f"# PEFT step benchmark ({c['backbone']}{' ' + json.dumps(c['backbone_kwargs']) if c['backbone_kwargs'] else ''}, "
        f"batch {c['batch']}, {c['img']} px, {c['threads']} CPU threads)",
        "",
        f"{c['cpu']}; torch {c['versions'].get('torch', '?')}, timm {c['versions'].get('timm', '?')}, "
        f"HF peft {c['versions'].get('hf_peft', '?')}; {'--quick' if c['quick'] else 'full'} settings, "
        f"{c['warmup']} warm-up + {c['steps']} timed steps; load average {c['loadavg_start']} at start, "
        f"{res.get('loadavg_end', '?')} at end; total {res.get('runtime_s', 0):.0f} s.",
        "",
        "## Training step (forward + backward + AdamW)",
        "",
        f"| method | trainable params | step s (median) | step s (min) | step vs full (target <= {t['step_ratio_max']:.2f}x) "
        f"| peak RSS GiB | peak RSS vs full (target <= {t['memory_ratio_max']:.2f}x) "
        f"| peak above baseline GiB | above baseline vs full (target <= {t['memory_ratio_max']:.2f}x) "
        f"| 1-min load before -> after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["train_step"]:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error']} | | | | | | | | {r['loadavg_1min']} |")
            continue
        full = r["key"] == "full"
        cell = (lambda v, lim: _x(v)) if full else _meets
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {_sec(r['step_s'])} | {_sec(r['step_s_min'])} | {cell(r['step_ratio'], t['step_ratio_max'])} "
            f"| {r['peak_rss_gib']:.2f} | {cell(r['peak_rss_ratio'], t['memory_ratio_max'])} "
            f"| {r['peak_above_baseline_gib']:.2f} | {cell(r['peak_above_baseline_ratio'], t['memory_ratio_max'])} "
            f"| {r['loadavg_1min']} |")
    lines += [
        "",
        "## Inference (eval, torch.inference_mode, forward_features)",
        "",
        f"| model | forward s (median of {c['infer_reps']}) | forward s (min) | vs bare (median) "
        f"| target <= {t['merged_ratio_max']:.2f}x |",
        "|---|---:|---:|---:|---|",
    ]
    inf = res["inference"]
    if "error" in inf:
        lines.append(f"| error: {inf['error']} | | | |")
    else:
        for r in inf["rows"]:
            target = _meets(r["ratio"], t["merged_ratio_max"]) if r["model"] == "lora_merged" else ""
            lines.append(f"| {r['label']} | {_sec(r['median_s'])} | {_sec(r['min_s'])} | {_x(r['ratio'])} | {target} |")
        lines.append("")
        lines.append(f"Merged vs unmerged LoRA output: max abs difference {inf['merged_max_abs_diff']:.2e} "
                     "(LoRA B initialised non-zero for this check).")
    lines += ["", "## Linear-probe epoch: cached vs recomputed features", ""]
    p = res["probe_epoch"]
    if "error" in p:
        lines.append(f"error: {p['error']}")
    else:
        lines += [
            f"| images | recomputed epoch s | cached epoch s (median of {c['probe_epochs']}) | cached epoch s (min) "
            f"| speed-up (target >= {t['cache_speedup_min']:.0f}x) | one-time cache fill s | cache load s "
            f"| speed-up incl. cache load |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {p['images']} | {_sec(p['recompute_epoch_s'])} | {_sec(p['cached_epoch_s'])} | {_sec(p['cached_epoch_s_min'])} "
            f"| {_meets(p['speedup'], t['cache_speedup_min'], below=False)} | {_sec(p['cache_fill_s'])} "
            f"| {_sec(p['cache_load_s'])} | {_x(p['speedup_with_load'])} |",
        ]
    lines += [
        "",
        "Notes:",
        "- Each configuration (and the inference and probe measurements) runs in a fresh process forked from a "
        "multiprocessing forkserver that has only imported torch, timm and the PEFT core.",
        "- Peak RSS = the child's VmHWM (/proc/self/status) from its own start, reset there with "
        "/proc/self/clear_refs; it includes the Python/torch runtime. Peak above baseline = VmHWM during "
        "the optimizer's creation, warm-up and timed steps minus the RSS once the model, its PEFT methods, "
        "the head and one batch were built. getrusage ru_maxrss is not used: it survives exec and reports "
        "the parent's peak when that is higher."
        + ("" if res.get("peak_reset_ok", True) else " WARNING: clear_refs was refused here, so peaks "
           "include the forkserver's import peak."),
        "- Full fine-tuning trains every backbone parameter + the head; the linear probe runs the backbone under "
        "torch.no_grad; PEFT rows use shared.peft.attach(backbone, [method]) + Classifier(backbone, "
        "LinearHead(pool='cls')). Random weights, random inputs, 10 classes.",
        "- Times are wall-clock (time.perf_counter) medians; the min beside them shows the spread. On a shared "
        "machine other processes inflate both (see the load averages above), small operations the most: "
        "with 2 threads on 2 busy cores a millisecond-sized step can wait tens of milliseconds.",
        "- (yes)/(no): whether the ratio meets the issue's target. Targets were not used to tune this benchmark.",
        "- The *top half* rows attach the method to the upper blocks only; autograd then needs no backward "
        "below the lowest adapted block. They are different (smaller) configurations, not the same method faster.",
    ]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    from shared.fs import atomic_write

    atomic_write(path, text)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="depth-2 ViT-B-width backbone, fewer steps and images (~45 s idle)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for peft_step.json / peft_step.md")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every measurement")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=224, help="image size in pixels")
    ap.add_argument("--backbone", default="vit_base_patch16_224", help="timm model name (random weights)")
    ap.add_argument("--backbone-kwargs", type=json.loads, default=None,
                    help='JSON of extra timm.create_model kwargs, e.g. \'{"depth": 2}\'')
    ap.add_argument("--warmup", type=int, default=None, help="untimed training steps (default 3; quick 2); the first two "
                    "pay page faults for gradients and optimizer state")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 8; quick 3)")
    ap.add_argument("--infer-reps", type=int, default=None, help="timed forwards per model (default 12; quick 5)")
    ap.add_argument("--probe-images", type=int, default=None, help="probe dataset size (default 64; quick 16)")
    ap.add_argument("--probe-epochs", type=int, default=None, help="timed cached epochs (default 20; quick 5)")
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in [("warmup", 3, 2), ("steps", 8, 3), ("infer_reps", 12, 5),
                              ("probe_images", 64, 16), ("probe_epochs", 20, 5)]:
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.backbone_kwargs is None:
        args.backbone_kwargs = {"depth": 2} if q else {}
    for name in ("threads", "batch", "img", "steps", "infer_reps", "probe_images", "probe_epochs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    return args


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    spec = {k: getattr(args, k) for k in ("threads", "batch", "img", "backbone", "backbone_kwargs", "warmup",
                                          "steps", "infer_reps", "probe_images", "probe_epochs")}
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "shared.peft", "shared.heads", "shared.data"])
    config = {**spec, "quick": args.quick, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "loadavg_start": _loadavg(), "versions": {}}
    res: dict = {"config": config, "targets": TARGETS}
    failed = False

    rows = []
    depth = int(spec.get("backbone_kwargs", {}).get("depth", 12))
    for key, label, method in train_configs(depth):
        print(f"[peft_step] training step: {label} ...", flush=True)
        load = _loadavg(1)
        try:
            r = _run_isolated(ctx, run_train, spec, key, method)
            config["versions"] = r.pop("versions")
        except Exception as e:  # keep the other rows; the exit status reports the failure
            r, failed = {"key": key, "error": _error(e)}, True
        rows.append({"label": label, "method": method, **r, "loadavg_1min": f"{load} -> {_loadavg(1)}"})
    full = next((r for r in rows if r["key"] == "full" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            continue
        if full is None:
            r["error"], failed = "no full fine-tuning reference", True
            continue
        r["step_ratio"] = _ratio(r["step_s"], full["step_s"])
        r["peak_rss_ratio"] = _ratio(r["peak_rss_gib"], full["peak_rss_gib"])
        r["peak_above_baseline_ratio"] = _ratio(r["peak_above_baseline_gib"], full["peak_above_baseline_gib"])
    res["train_step"] = rows
    res["peak_reset_ok"] = all(r.get("peak_reset_ok", True) for r in rows)

    print("[peft_step] inference: bare / LoRA unmerged / LoRA merged ...", flush=True)
    try:
        inf = _run_isolated(ctx, run_inference, spec)
        labels = {"bare": "bare backbone", "lora_unmerged": "LoRA r8 qkv, unmerged",
                  "lora_merged": "LoRA r8 qkv, merged (shared.peft.merge)"}
        med = {k: statistics.median(v) for k, v in inf["times"].items()}
        res["inference"] = {
            "rows": [{"model": k, "label": labels[k], "median_s": med[k], "min_s": min(inf["times"][k]),
                      "ratio": _ratio(med[k], med["bare"]),
                      "times_s": inf["times"][k]} for k in labels],
            "merged_max_abs_diff": inf["merged_max_abs_diff"]}
    except Exception as e:
        res["inference"], failed = {"error": _error(e)}, True

    print("[peft_step] linear-probe epoch: recomputed vs cached features ...", flush=True)
    try:
        p = _run_isolated(ctx, run_probe, spec)
        p.pop("versions")
        p["speedup"] = _ratio(p["recompute_epoch_s"], p["cached_epoch_s"])
        p["speedup_with_load"] = _ratio(p["recompute_epoch_s"], p["cached_epoch_s"] + p["cache_load_s"])
        res["probe_epoch"] = p
    except Exception as e:
        res["probe_epoch"], failed = {"error": _error(e)}, True

    res["loadavg_end"] = _loadavg()
    res["runtime_s"] = time.perf_counter() - start
    md = render_markdown(res)
    out = Path(args.out)
    _write_atomic(out / "peft_step.json", json.dumps(res, indent=2) + "\n")
    _write_atomic(out / "peft_step.md", md)
    print(md, flush=True)
    print(f"[peft_step] wrote {out / 'peft_step.json'} and {out / 'peft_step.md'} in {res['runtime_s']:.0f} s")
    return 1 if failed else 0


def _loadavg(n: int = 3) -> str:
    """The 1, 5 and 15 minute load averages (the first n): other work on the machine slows every timing."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:n])
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
