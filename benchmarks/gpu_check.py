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
4. Mixed-adapter serving (`benchmarks/adapter_bank.py` on the device): HF peft's mixed batch and
   `shared.peft.AdapterBank` on ViT-S/16, batch 32, 8 adapters; throughput ratios and max |diff|.

Writes <out>/gpu_check.json and <out>/gpu_check.md and prints the table; exit status 1 when a
check failed (the report says which).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
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
    if res.get("adapter_bank"):
        lines += ["", "## Mixed-adapter serving (benchmarks/adapter_bank.py), ViT-S/16 random weights, 8 adapters", "",
                  "| method | path | min s | median s | mixed / one | max abs diff | ok |", "|---|---|---:|---:|---:|---:|---|"]
        for r in res["adapter_bank"]:
            ratio = f"{r['mixed_over_one']:.3f}x" if r["mixed_over_one"] is not None else ""
            diff = f"{r['max_abs_diff']:.2e}" if r["max_abs_diff"] is not None else ""
            lines.append(f"| {r['method']} | {r['path']} | {r['min_s']:.4f} | {r['median_s']:.4f} | {ratio} | {diff} | "
                         f"{r['ok']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu to exercise the script without a GPU")
    ap.add_argument("--quick", action="store_true", help="fewer matrix cases and a 2-block 64 px ViT-B")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--skip-demos", action="store_true")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); "
              "pass --device cpu to run the same checks on the CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    res = {"device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "quick": args.quick,
           "step_config": "batch 4, 64 px, 2 blocks, bf16 autocast" if args.quick else "batch 32, 224 px, bf16 autocast"}
    failed = False
    for name, fn in (("matrix", lambda: check_matrix(args.device, args.quick)),
                     ("demos", lambda: [] if args.skip_demos else check_demos(args.device, 300)),
                     ("steps", lambda: check_steps(args.device, args.quick)),
                     ("adapter_bank", lambda: check_adapter_bank(args.device, args.quick))):
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            res[name] = fn()
        except Exception:  # noqa: BLE001 - the other checks still run
            res[name], failed = [], True
            res[f"{name}_error"] = traceback.format_exc()[-2000:]
            print(res[f"{name}_error"], file=sys.stderr)
    failed = failed or any(not r["ok"] for r in res["matrix"] + res["demos"] + res["adapter_bank"])
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
