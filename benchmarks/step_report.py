"""The Markdown table of `benchmarks/peft_step.py`'s results (ratios to full fine-tuning beside the targets)."""
from __future__ import annotations

import json
import platform
from pathlib import Path

from step_runs import MODELS

# ----------------------------------------------------------------------------- report
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ratio(a: float, b: float) -> float | None:
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
    real = "model" in c  # a real-weights model (--model other than vit)
    m = MODELS[c.get("model", "vit")]
    if real:
        size = (f"{c['seq']} tokens" if m["kind"] == "text" else
                f"{c['backbone_kwargs']['max_frames']} frames" if m["kind"] == "audio" else f"{c['img']} px")
        title = f"{m['title']} via {c['backbone']}, batch {c['batch']}, {size}, {c['threads']} CPU threads"
    else:
        title = (f"{c['backbone']}{' ' + json.dumps(c['backbone_kwargs']) if c['backbone_kwargs'] else ''}, "
                 f"batch {c['batch']}, {c['img']} px, {c['threads']} CPU threads")
    transformers = f", transformers {c['versions']['transformers']}" if "transformers" in c["versions"] else ""
    lines = [
        f"# PEFT step benchmark ({title})",
        "",
        f"{c['cpu']}; torch {c['versions'].get('torch', '?')}, timm {c['versions'].get('timm', '?')}{transformers}, "
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
    lines += _depth_lines(res)
    lines += [
        "",
        "## Inference (eval, torch.inference_mode, "
        + ("the anatomy's forward_tokens)" if real and m["kind"] == "text" else "forward_features)"),
        "",
    ]
    inf = res["inference"]
    if "skipped" in inf:
        lines.append(inf["skipped"])
    else:
        lines += [f"| model | forward s (median of {c['infer_reps']}) | forward s (min) | vs bare (median) "
                  f"| target <= {t['merged_ratio_max']:.2f}x |", "|---|---:|---:|---:|---|"]
    if "skipped" in inf:
        pass
    elif "error" in inf:
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
    if "skipped" in p:
        lines.append(p["skipped"])
    elif "error" in p:
        lines.append(f"error: {p['error']}")
    else:
        unit = "sequences" if "sequences" in p else "images"
        lines += [
            f"| {unit} | recomputed epoch s | cached epoch s (median of {c['probe_epochs']}) | cached epoch s (min) "
            f"| speed-up (target >= {t['cache_speedup_min']:.0f}x) | one-time cache fill s | cache load s "
            f"| speed-up incl. cache load |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {p[unit]} | {_sec(p['recompute_epoch_s'])} | {_sec(p['cached_epoch_s'])} | {_sec(p['cached_epoch_s_min'])} "
            f"| {_meets(p['speedup'], t['cache_speedup_min'], below=False)} | {_sec(p['cache_fill_s'])} "
            f"| {_sec(p['cache_load_s'])} | {_x(p['speedup_with_load'])} |",
        ]
    lines += [
        "",
        "Notes:",
        "- Each configuration (and the inference and probe measurements) runs in a fresh process forked from a "
        "multiprocessing forkserver that has only imported torch, timm"
        + (", transformers, the backbone registry" if real else "") + " and the PEFT core.",
        "- Peak RSS = the child's VmHWM (/proc/self/status) from its own start, reset there with "
        "/proc/self/clear_refs; it includes the Python/torch runtime. Peak above baseline = VmHWM during "
        "the optimizer's creation, warm-up and timed steps minus the RSS once the model, its PEFT methods, "
        "the head and one batch were built. getrusage ru_maxrss is not used: it survives exec and reports "
        "the parent's peak when that is higher."
        + ("" if res.get("peak_reset_ok", True) else " WARNING: clear_refs was refused here, so peaks "
           "include the forkserver's import peak."),
        "- Full fine-tuning trains every backbone parameter + the head; the linear probe runs the backbone under "
        "torch.no_grad; PEFT rows use shared.peft.attach(backbone, [method]) + Classifier(backbone, "
        f"LinearHead(pool='{m['pool']}')). "
        + (f"Real weights: {c['weights']}; {_input_note(c, m)}, 10 classes." if real
           else "Random weights, random inputs, 10 classes."),
        "- Times are wall-clock (time.perf_counter) medians; the min beside them shows the spread. On a shared "
        "machine other processes inflate both (see the load averages above), small operations the most: "
        "with 2 threads on 2 busy cores a millisecond-sized step can wait tens of milliseconds.",
        "- (yes)/(no): whether the ratio meets the issue's target. Targets were not used to tune this benchmark.",
        "- The *top half* rows attach the method to the upper blocks only; autograd then needs no backward "
        "below the lowest adapted block. They are different (smaller) configurations, not the same method faster.",
    ]
    if res.get("left_out"):
        lines.append("- Left out on this model (the core does not support them on its family): "
                     + "; ".join(res["left_out"].values()) + ".")
    if real and m["kind"] == "text":
        lines.append(f"- Cached-feature probe: features are the head's pooling ({m['pool']}) of the final tokens, "
                     "one vector per sequence; the cached epoch trains the same head on them.")
    if "staged" in c:
        lines.append(f"- SmolLM2 was loaded from its GGUF through hf-causal-lm once ({c['staged']['gguf_load_s']:.0f} s) "
                     "and saved as an fp32 safetensors folder in a temporary directory; every measurement loaded "
                     "that folder through hf-causal-lm (same weight fingerprint), so no row includes the GGUF "
                     "dequantisation in its time or peak memory.")
    return "\n".join(lines) + "\n"


def _mib(v: float) -> str:
    return f"{v / 2**20:.3g}"


def _depth_lines(res: dict) -> list[str]:
    """The depth-caching section: LoRA on the top blocks uncached, the caching epoch, the step from the
    cache, the cache's size and the linear probe, each relative to full fine-tuning."""
    d = res.get("depth_cache")
    if d is None:
        return []
    t = res["targets"]
    lines = ["", "## Depth caching (shared.depth_cache): the top blocks trained from cached block inputs", ""]
    if "skipped" in d:
        return lines + [f"Left out: {d['skipped']}."]
    lines += [
        f"| row | s (median) | s (min) | vs full fine-tuning | peak RSS GiB | 1-min load before -> after |",
        "|---|---:|---:|---:|---:|---|",
    ]
    fill = None
    for r in d["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error']} | | | | {r['loadavg_1min']} |")
            continue
        if r["key"] == "depth_fill":
            fill = r
            lines.append(f"| {r['label']} | {_sec(r['fill_s_per_batch'])} | | {_x(r.get('ratio'))} "
                         f"| {r['peak_rss_gib']:.2f} | {r['loadavg_1min']} |")
            continue
        cell = _meets(r.get("ratio"), t["depth_cached_ratio_max"]) if r["key"] == "depth_cached" else _x(r.get("ratio"))
        rss = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else ""
        lines.append(f"| {r['label']} | {_sec(r['step_s'])} | {_sec(r['step_s_min'])} | {cell} | {rss} "
                     f"| {r['loadavg_1min']} |")
    lines.append("")
    if "caching_epoch_ratio" in d:
        lines.append(f"- The epoch that writes the cache costs {_x(d['caching_epoch_ratio'])} of full fine-tuning per "
                     f"batch (the lower blocks' no_grad forward + the cached step); every later epoch, seed and run "
                     f"pays the cached step alone.")
    if fill is not None:
        per1k = fill["bytes_per_example"] * 1000
        diff = fill["logit_max_abs_diff"]
        lines += [
            f"- Target: the cached step <= {t['depth_cached_ratio_max']:.2f}x of full fine-tuning's step "
            f"(target from the issue; not tuned for).",
            f"- The cache holds the tokens entering block {fill['block']} of {fill['n_blocks']} in {fill['storage']}: "
            f"{_mib(fill['bytes'])} MiB for {fill['examples']} examples, {_mib(per1k)} MiB per 1,000 examples "
            f"({fill['bytes_per_example'] / 1024:.1f} KiB each).",
            f"- Storage rounding, eval mode, one batch: max |logit difference| to the uncached forward "
            f"{diff['fp32']:.1e} (fp32), {diff['fp16']:.1e} (fp16), {diff['bf16']:.1e} (bf16); "
            f"max |logit| {fill['logit_max_abs']:.3g}.",
            "- The cached step reads its shuffled batch from the cache's memory map (page cache warm), then runs the "
            "adapted blocks, the final norm and the head forward and backward; nothing below the lowest adapted "
            "block runs. Each row ran in its own process.",
        ]
    return lines


def _input_note(c: dict, m: dict) -> str:
    if m["kind"] == "image":
        return "random N(0, 1) images"
    if m["kind"] == "audio":
        return (f"random N(0, 1) log-mel features ({m['mels']} mel bins x {c['backbone_kwargs']['max_frames']} "
                f"frames); the training rows are the methods of the recipes {m['recipes'].format('<row>')}")
    call = "".join(f", {k}={v}" for k, v in m.get("call", {}).items())
    return (f"random token ids (no special tokens) of length {c['seq']}, right-padded: row lengths uniform in "
            f"[{max(1, c['seq'] // 2)}, {c['seq']}] (the first row full), attention mask 0 on padding{call}")


def write_atomic(path: Path, text: str) -> None:
    from shared.fs import atomic_write

    atomic_write(path, text)


