#!/usr/bin/env python
"""GPU readiness check of the suite, one short script (< 5 minutes on one GPU).

    python benchmarks/gpu_check.py --out benchmarks/results          # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/g  # the same code paths on a CPU

1. The method x anatomy matrix (tests/shared/test_matrix.py's SPECS and VARIANTS) on the device,
   in fp32 and under bf16 autocast: every new tensor on the device; identity at init; two
   training steps move the method's tensors; save -> load on a fresh device backbone is exact;
   merge keeps outputs.
2. The two demo CLIs, `python -m audio.train` and `python -m medical.train`, with
   `--trainer.accelerator gpu` (one epoch each), and `medical.train` once more sharded with FSDP2
   (`--trainer.strategy ModelParallelStrategy`, one device).
3. Training-step time and peak device memory of ViT-B/16 (random weights, batch 32, 224 px,
   bf16 autocast) per method, as ratios to full fine-tuning.
4. Depth caching (issue 22): LoRA on the top 3 of 12 blocks of the same ViT-B/16 trained from the
   depth cache (`shared.depth_cache`, bf16 storage) against full fine-tuning's step, beside the
   uncached top-3 LoRA and the linear probe, timed interleaved in one process; the caching epoch's
   time, the cache's size, and cached vs uncached eval-mode logits (models and the LoRA row from
   `benchmarks/peft_step.py` / `step_runs.py`).
5. Batched prediction (issue 22, `benchmarks/predict_throughput.py`): files/s of the four predict
   CLIs file by file against their batched defaults, and RSS over 2,000 files. The predict CLIs
   run on the CPU (they have no device option): on a GPU machine this row measures its CPUs.
6. Mixed-adapter serving (`benchmarks/adapter_bank.py` on the device): HF peft's mixed batch and
   `shared.peft.AdapterBank` on ViT-S/16, batch 32, 8 adapters, against one adapter; throughput
   ratios, ours against peft's mixed batch, and max |diff|.

`--only depth_cache,adapter_bank` runs some sections; `--quick` shrinks every one (a 2-block 64 px
ViT-B for the steps, 2-block 32 px ViT-S for depth caching, 10 files per predict CLI, 1-block 32 px
ViT-S for serving), which is how it is tested on the CPU
(`tests/benchmarks/test_gpu_check_smoke.py`).

Writes <out>/gpu_check.json and <out>/gpu_check.md and prints the table; exit status 1 when a
check failed (the report says which).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

STEP_CONFIGS = [  # (key, label, methods, recompute)
    ("full", "full fine-tuning", [{"name": "full"}], False),
    ("linear_probe", "linear probe (frozen backbone)", None, False),
    ("lora", "LoRA r8 a16 on qkv", [{"name": "lora", "r": 8, "alpha": 16, "targets": ["qkv"]}], False),
    ("lora_qv", "LoRA r8 on q and v of the fused qkv", [{"name": "lora_qkv", "r": 8, "alpha": 16}], False),
    ("adapter", "adapter ffn parallel b64", [{"name": "adapter", "placement": "ffn", "mode": "parallel",
                                              "bottleneck": 64}], False),
    ("prompt", "deep prompt, 10 tokens", [{"name": "prompt", "n_tokens": 10, "deep": True}], False),
    ("bitfit", "BitFit", [{"name": "bitfit"}], False),
    ("full_recompute", "full fine-tuning + recompute", [{"name": "full"}], True),
    ("lora_recompute", "LoRA r8 a16 on qkv + recompute", [{"name": "lora", "r": 8, "alpha": 16, "targets": ["qkv"]}],
     True),
]


SECTIONS = ("matrix", "demos", "steps", "depth_cache", "predict", "adapter_bank")


def _load(name: str, path: Path):
    """Import a test module by path (the suite's tests use importlib mode, not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def _matrix_module():
    return _load("matrix_cases", ROOT / "tests" / "shared" / "test_matrix.py")


def _conftest():
    return _load("tiny_conftest", ROOT / "tests" / "conftest.py")


def check_matrix(device: str, quick: bool) -> list[dict]:
    """One row per (anatomy, method, precision) with the first failure, if any."""
    from shared import peft
    from shared.heads import LinearHead

    mx, tiny = _matrix_module(), _conftest()
    rows = []
    cases = [(a, v) for a in mx.SPECS for v in mx.VARIANTS if v not in mx.SPECS[a].unsupported]
    if quick:
        cases = [c for c in cases if c[0] in ("vit", "llama")]
    for precision in ("fp32", "bf16-autocast"):
        for anat, variant in cases:
            row = {"anatomy": anat, "method": variant, "precision": precision, "ok": True, "failure": ""}
            try:
                _one_case(mx, tiny, peft, LinearHead, anat, variant, device, precision == "bf16-autocast")
            except Exception as e:  # noqa: BLE001 - every case is reported
                row.update(ok=False, failure=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
    return rows


def _one_case(mx, tiny, peft, LinearHead, anat, variant, device, bf16):
    pristine = tiny.make_backbone(anat).to(device)
    model = copy.deepcopy(pristine)
    method = mx.VARIANTS[variant].make(mx.SPECS[anat])
    peft.attach(model, [method])
    where = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    assert where == {torch.device(device).type}, f"tensors on {where}"
    x = tiny.make_input(anat)
    x = x.to(device)
    tol = 3e-2 if bf16 else 1e-4

    def run(m, inp):  # autocast per forward, as Lightning does per step (its weight cache lives per context)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            return m(inp)

    if mx.VARIANTS[variant].identity:
        with torch.no_grad():
            ref = run(lambda i: tiny.tokens(pristine.eval(), i), x)
            out = run(lambda i: tiny.tokens(model.eval(), i), x)
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    clf = peft.Classifier(model, LinearHead(mx.D, 5, pool=mx.SPECS[anat].pool).to(device))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    clf.train()
    for _ in range(3):
        opt.zero_grad()
        run(clf, x).float().pow(2).mean().backward()
        opt.step()
    clf.eval()
    still = [n for n, p in model.named_parameters() if n in trained and torch.equal(p, trained[n])]
    assert not still, f"did not train: {still[:3]}"
    with torch.no_grad():
        with tempfile.TemporaryDirectory() as tmp:
            peft.save(clf, Path(tmp) / "b", labels=[f"c{i}" for i in range(5)])
            loaded = peft.load(copy.deepcopy(pristine), Path(tmp) / "b").eval()
            assert torch.equal(run(loaded, x), run(clf, x)), "save -> load changed the logits"
        before = run(clf, x).float()
        report = peft.merge(clf)
        after = run(clf, x).float()
    torch.testing.assert_close(after, before, atol=tol * 10, rtol=tol)
    if mx.VARIANTS[variant].mergeable:
        assert set(report.values()) == {"merged"}, report


def check_demos(device: str, timeout: int) -> list[dict]:
    accel = "gpu" if device.startswith("cuda") else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fsdp2 = ["--trainer.strategy", "ModelParallelStrategy", "--trainer.strategy.data_parallel_size", "1",
                 "--trainer.strategy.tensor_parallel_size", "1"]  # FSDP2 through configure_model, one device
        for i, (mod, extra) in enumerate((("audio.train", []), ("medical.train", []), ("medical.train", fsdp2))):
            out = Path(tmp) / f"{mod.replace('.', '_')}_{i}"
            cmd = [sys.executable, "-m", mod, "--trainer.accelerator", accel, "--trainer.devices", "1",
                   "--trainer.max_epochs", "1", "--output_dir", str(out), *extra]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout)
            row = {"command": " ".join(["python", "-m", mod, "--trainer.accelerator", accel, "--trainer.max_epochs 1",
                                        *extra]),
                   "seconds": round(time.perf_counter() - t0, 1), "ok": p.returncode == 0}
            metrics = out / "metrics.json"
            if p.returncode == 0 and metrics.exists():
                m = json.loads(metrics.read_text())
                row["test/acc"] = m.get("test/acc")
            else:
                row.update(ok=False, failure=(p.stderr or p.stdout)[-600:])
            rows.append(row)
    return rows


def check_steps(device: str, quick: bool) -> list[dict]:
    import timm
    import torch.nn.functional as F

    from shared import heads, peft

    batch, img, depth = (4, 64, 2) if quick else (32, 224, 12)
    warmup, steps = (1, 2) if quick else (3, 10)
    cuda = device.startswith("cuda")
    rows = []
    for key, label, methods, recompute in STEP_CONFIGS:
        torch.manual_seed(0)
        backbone = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=img,
                                     depth=depth).to(device)
        if methods is None:
            backbone.requires_grad_(False)
        else:
            peft.attach(backbone, methods, compute_fingerprint=False)
        if recompute:
            peft.recompute(backbone)
        model = peft.Classifier(backbone, heads.LinearHead(backbone.num_features, 10, pool="cls")).to(device)
        x = torch.randn(batch, 3, img, img, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()

        def step():
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                if methods is None:
                    with torch.no_grad():
                        tokens = model.tokens(x)
                    logits = model.head(tokens)
                else:
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        rows.append({"key": key, "label": label, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "step_s": statistics.median(times), "peak_gib": peak})
        del model, backbone, opt
        if cuda:
            torch.cuda.empty_cache()
    full = next(r for r in rows if r["key"] == "full")
    for r in rows:
        r["step_ratio"] = r["step_s"] / full["step_s"]
        r["memory_ratio"] = r["peak_gib"] / full["peak_gib"] if cuda else None
    return rows


def _bench(name: str):
    """A benchmark module beside this script (benchmarks/<name>.py), imported by path."""
    return _load(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_depth_cache(device: str, quick: bool) -> dict:
    """Issue 22's depth-caching row on the device, in one process, the configurations interleaved: LoRA on the
    top 3 of 12 blocks trained from the depth cache vs full fine-tuning's step, beside the same LoRA uncached
    and the linear probe; the caching epoch's time and the cache's size on disk; the cached path's eval-mode
    logits against the uncached ones (fp32 and the storage dtype). The models, the LoRA row and the data come
    from benchmarks/peft_step.py / step_runs.py (random timm ViT-B/16), the cache from shared.depth_cache."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from shared.depth_cache import STORAGE, DepthRows, cached_loader, depth_plan, write_rows

    ps = _bench("peft_step")
    sr = sys.modules["step_runs"]  # peft_step's child-measurement module: models and data
    depth, img, batch, warmup, reps = (2, 32, 4, 1, 2) if quick else (12, 224, 32, 3, 10)
    name = "vit_small_patch16_224" if quick else "vit_base_patch16_224"  # quick: a smoke run of the same code
    spec = {"backbone": name, "backbone_kwargs": {"depth": depth}, "img": img, "batch": batch,
            "threads": torch.get_num_threads()}
    top, label, method = ps.depth_config(depth)
    cuda = device.startswith("cuda")
    storage = "bf16" if cuda else "fp16"  # what --model.depth_cache auto picks (bf16 under bf16 precision)
    amp = dict(device_type=torch.device(device).type, dtype=torch.bfloat16)

    def build(m, frozen=False):
        torch.manual_seed(0)  # the same backbone weights in every model
        return sr._classifier(spec, m, frozen=frozen).to(device)

    models = {"full": build(None), "lora_top": build(method), "lora_top_cached": build(method),
              "linear_probe": build(None, frozen=True)}
    n = batch * (warmup + reps)
    data = sr._depth_data(spec, n, models["full"].backbone)  # n random images and labels (CPU)
    x, y = data.tensors[0][:batch].to(device), data.tensors[1][:batch].to(device)
    cached = models["lora_top_cached"]
    plan = depth_plan(cached)

    # equality first: the cached path's eval-mode logits against the uncached forward (fp32, then each storage)
    cached.eval()
    with torch.no_grad():
        ref = cached(x).float()
        entering = cached.anatomy.tokens_entering(plan.block, x)
        diffs = {}
        for name, dtype in STORAGE.items():
            r = type(entering)(entering.block, entering.tokens.to(dtype), entering.mask, entering.grid,
                               entering.input_ndim)
            diffs[name] = (cached(r).float() - ref).abs().max().item()

    # the caching epoch: the tokens entering block k of every example, written once (bf16 autocast on a GPU)
    folder = tempfile.mkdtemp(prefix="gpu_check_depth_")
    try:
        _sync(device)
        t0 = time.perf_counter()
        meta = write_rows(cached, DataLoader(data, batch_size=batch), plan.block, storage, folder,
                          autocast=(lambda: torch.autocast(**amp)) if cuda else None)
        _sync(device)
        fill_s = time.perf_counter() - t0
        rows = DepthRows(folder)
        cache_bytes = rows.nbytes
        loader = cached_loader(rows, like=DataLoader(range(n), batch_size=batch, shuffle=True))
        batches = sr.endless(loader)

        def next_cached():
            r, yb = next(batches)
            return type(r)(r.block, r.tokens.to(device, non_blocking=True), r.mask, r.grid, r.input_ndim), yb.to(device)

        opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}

        def step(key):
            m = models[key]
            with torch.autocast(**amp, enabled=cuda):
                if key == "linear_probe":
                    with torch.no_grad():
                        tokens = m.tokens(x)
                    logits, target = m.head(tokens), y
                elif key == "lora_top_cached":
                    r, target = next_cached()  # the host read and the copy to the device are part of the step
                    logits = m(r)
                else:
                    logits, target = m(x), y
                loss = F.cross_entropy(logits.float(), target)
            loss.backward()
            opts[key].step()
            opts[key].zero_grad(set_to_none=True)

        keys = list(models)
        for m in models.values():
            m.train()
        for _ in range(warmup):
            for k in keys:
                step(k)
        times = {k: [] for k in keys}
        for rep in range(reps):
            for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:  # rotated: no configuration always first
                _sync(device)
                t0 = time.perf_counter()
                step(k)
                _sync(device)
                times[k].append(time.perf_counter() - t0)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    labels = {"full": "full fine-tuning", "lora_top": f"{label}, uncached",
              "lora_top_cached": f"{label}, from the depth cache ({storage})",
              "linear_probe": "linear probe (no_grad backbone)"}
    full = statistics.median(times["full"])
    out_rows = [{"key": k, "label": labels[k], "step_s": statistics.median(times[k]), "step_s_min": min(times[k]),
                 "ratio": statistics.median(times[k]) / full, "ratio_min": min(times[k]) / min(times["full"]),
                 "trainable": sum(p.numel() for p in models[k].parameters() if p.requires_grad)} for k in keys]
    batches_n = -(-n // batch)
    fill_per_batch = fill_s / batches_n
    cached_step = statistics.median(times["lora_top_cached"])
    return {"config": f"{'ViT-S/16' if quick else 'ViT-B/16'} random weights, {depth} blocks, {img} px, batch {batch}"
                      + (", bf16 autocast" if cuda else ", fp32") + f", {reps} interleaved repetitions",
            "top": top, "block": plan.block, "storage": storage, "examples": n, "rows": out_rows,
            "fill_s": fill_s, "fill_s_per_batch": fill_per_batch, "cache_bytes": cache_bytes,
            "cache_bytes_per_example": cache_bytes / n, "written_meta_s": meta["seconds"],
            "caching_epoch_ratio": (fill_per_batch + cached_step) / full,
            "logit_max_abs_diff": diffs, "logit_max_abs": ref.abs().max().item(),
            "goal_ratio_max": ps.TARGETS["depth_cached_ratio_max"],
            "ok": diffs["fp32"] < 1e-4 and all(math.isfinite(r["step_s"]) for r in out_rows)}


def check_predict(device: str, quick: bool) -> dict:
    """Issue 22's batched-prediction row: benchmarks/predict_throughput.py's files/s of the four predict CLIs,
    file by file (--batch-size 1 --workers 0) against their defaults, and the RSS over a long run. The predict
    CLIs load their bundle on the CPU (they have no device option), so on a GPU machine this measures its
    CPUs; the row says so."""
    pt = _bench("predict_throughput")
    args = argparse.Namespace(quick=quick, files=10 if quick else 200, repeat=1 if quick else 3,
                              domains=list(pt.DOMAINS), rss_domains=["audio"], rss_files=10 if quick else 2000,
                              sweep=[], sweep_domain="medical-real", threads=0)
    res = pt.measure(args)
    res["where"] = (f"the predict CLIs run on the CPU (no device option): {res['config']['cpus']} CPUs of this "
                    f"machine{', not the GPU' if device.startswith('cuda') else ''}")
    res["ok"] = all("skipped" in r or r["after"]["files"] == args.files for r in res["rows"])
    return res


def check_adapter_bank(device: str, quick: bool) -> list[dict]:
    """benchmarks/adapter_bank.py's rows on the device; a mixed row fails when it is not one-at-a-time."""
    ab = _load("adapter_bank_bench", ROOT / "benchmarks" / "adapter_bank.py")
    res = ab.measure(ab.parse_args(["--device", device, "--threads", str(torch.get_num_threads())]
                                   + (["--quick"] if quick else [])))
    rows = []
    for r in res["rows"]:
        group, kind = r["key"].rsplit("_", 1)
        diff = res["max_abs_diff"].get(r["key"])
        rows.append({"method": r["method"], "path": r["label"], "min_s": r["min_s"], "median_s": r["median_s"],
                     "mixed_over_one": res["ratios"][group]["min"] if kind == "mixed" else None,
                     "max_abs_diff": diff, "ok": diff is None or diff < 1e-4})
        if r["key"] == "lora/ours_mixed":  # side by side: ours mixed against HF peft's mixed batch, same model
            x = res["ratios"].get("lora/ours_vs_peft_mixed")
            if x:
                rows[-1]["vs_peft_mixed"] = {"min": x["min"], "median": x["median"]}
    return rows


def render(res: dict) -> str:
    lines = [f"# GPU check: {res['device_name']}", "",
             f"torch {res['torch']}, {res['seconds']:.0f} s in all.", "",
             "## Method x anatomy matrix on the device", ""]
    m = res["matrix"]
    for precision in ("fp32", "bf16-autocast"):
        rows = [r for r in m if r["precision"] == precision]
        bad = [r for r in rows if not r["ok"]]
        lines.append(f"- {precision}: {len(rows) - len(bad)} / {len(rows)} cases pass")
        lines += [f"  - FAIL {r['anatomy']} / {r['method']}: {r['failure']}" for r in bad]
    lines += ["", "## Demo CLIs", "", "| command | s | ok | test/acc |", "|---|---:|---|---:|"]
    lines += [f"| `{r['command']}` | {r['seconds']} | {r['ok']} | {r.get('test/acc', '')} |" for r in res["demos"]]
    lines += ["", f"## Training step, ViT-B/16 random weights, {res['step_config']}", "",
              "| configuration | trainable | step s | vs full | peak GiB | vs full |", "|---|---:|---:|---:|---:|---:|"]
    for r in res["steps"]:
        mem = f"{r['peak_gib']:.2f} | {r['memory_ratio']:.2f}x" if r["memory_ratio"] is not None else "n/a | n/a"
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r['step_s']:.4f} | {r['step_ratio']:.2f}x | {mem} |")
    d = res.get("depth_cache")
    if d:
        lines += ["", f"## Depth caching (issue 22), {d['config']}", "",
                  f"LoRA on the top {d['top']} block(s) (from block {d['block']}); the cache holds the tokens entering "
                  f"block {d['block']} in {d['storage']}: {d['cache_bytes'] / 2**20:.3g} MiB for {d['examples']} examples "
                  f"({d['cache_bytes_per_example'] / 2**10:.1f} KiB each), written in {d['fill_s']:.2f} s "
                  f"({d['fill_s_per_batch']:.4f} s per batch); the caching epoch's step (fill + cached step) "
                  f"{d['caching_epoch_ratio']:.2f}x full fine-tuning's.", "",
                  "| configuration | trainable | step s (median) | vs full | step s (min) | vs full (min) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            lines.append(f"| {r['label']} | {r['trainable']:,} | {r['step_s']:.4f} | {r['ratio']:.2f}x | "
                         f"{r['step_s_min']:.4f} | {r['ratio_min']:.2f}x |")
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in d["logit_max_abs_diff"].items())
        lines += ["", f"Goal (issue 22): from the cache <= {d['goal_ratio_max']:.2f}x full fine-tuning's step. "
                      f"Cached vs uncached eval-mode logits, max abs diff by storage: {diffs} "
                      f"(logits up to {d['logit_max_abs']:.2f})."]
    p = res.get("predict")
    if p:
        pt = _bench("predict_throughput")
        lines += ["", f"## Batched prediction (issue 22; benchmarks/predict_throughput.py), {p['where']}", ""]
        table = pt.markdown(p).split("\n")
        lines += [line for line in table[2:] if not line.startswith("Re-run:")]  # its own title and command left out
    if res.get("adapter_bank"):
        lines += ["", "## Mixed-adapter serving (benchmarks/adapter_bank.py), ViT-S/16 random weights, 8 adapters", "",
                  "| method | path | min s | median s | mixed / one | max abs diff | ok |", "|---|---|---:|---:|---:|---:|---|"]
        for r in res["adapter_bank"]:
            ratio = f"{r['mixed_over_one']:.3f}x" if r["mixed_over_one"] is not None else ""
            diff = f"{r['max_abs_diff']:.2e}" if r["max_abs_diff"] is not None else ""
            lines.append(f"| {r['method']} | {r['path']} | {r['min_s']:.4f} | {r['median_s']:.4f} | {ratio} | {diff} | "
                         f"{r['ok']} |")
        vs = next((r["vs_peft_mixed"] for r in res["adapter_bank"] if r.get("vs_peft_mixed")), None)
        if vs:
            lines += ["", f"LoRA, ours mixed vs HF peft's mixed batch on the same model: {vs['min']:.3f}x the throughput "
                          f"(min), {vs['median']:.3f}x (median)."]
    errors = [k for k in SECTIONS if res.get(f"{k}_error")]
    if errors:
        lines += ["", "## Checks that raised", ""]
        lines += [f"- {k}: {res[f'{k}_error'].strip().splitlines()[-1]}" for k in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu to exercise the script without a GPU")
    ap.add_argument("--quick", action="store_true", help="fewer matrix cases and a 2-block 64 px ViT-B")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--skip-demos", action="store_true")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated sections to run (default all): {', '.join(SECTIONS)}")
    args = ap.parse_args(argv)
    only = set(SECTIONS) if args.only is None else {x.strip() for x in args.only.split(",") if x.strip()}
    if not only or only - set(SECTIONS):
        ap.error(f"--only: unknown {sorted(only - set(SECTIONS)) or 'empty list'}; choose from {', '.join(SECTIONS)}")
    if args.skip_demos:
        only.discard("demos")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); "
              "pass --device cpu to run the same checks on the CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    res = {"device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "quick": args.quick,
           "step_config": "batch 4, 64 px, 2 blocks, bf16 autocast" if args.quick else "batch 32, 224 px, bf16 autocast"}
    failed = False
    checks = {"matrix": lambda: check_matrix(args.device, args.quick),
              "demos": lambda: check_demos(args.device, 300),
              "steps": lambda: check_steps(args.device, args.quick),
              "depth_cache": lambda: check_depth_cache(args.device, args.quick),
              "predict": lambda: check_predict(args.device, args.quick),
              "adapter_bank": lambda: check_adapter_bank(args.device, args.quick)}
    for name in SECTIONS:
        empty = {} if name in ("depth_cache", "predict") else []
        if name not in only:
            res[name] = empty
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            res[name] = checks[name]()
        except Exception:  # noqa: BLE001 - the other checks still run
            res[name], failed = empty, True
            res[f"{name}_error"] = traceback.format_exc()[-2000:]
            print(res[f"{name}_error"], file=sys.stderr)
    failed = failed or any(not r["ok"] for r in res["matrix"] + res["demos"] + res["adapter_bank"])
    failed = failed or any(res[k] and not res[k]["ok"] for k in ("depth_cache", "predict"))
    res["seconds"] = time.perf_counter() - t0
    md = render(res)
    print(md)
    from shared.fs import atomic_write

    out = Path(args.out)
    atomic_write(out / "gpu_check.json", json.dumps(res, indent=2, default=str) + "\n")
    atomic_write(out / "gpu_check.md", md)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
