"""`python -m audio.report RUNS [--metric M] [--bench FILE]`: the results table (mean +- std over
folds / seeds of one recipe) and the metric-vs-parameters plot. When RUNS holds probe runs of
`audio.probe` (bioacoustics), it also writes the test-set x probe-kind table and grouped bar chart
(`audio.birds.report`; default metric test/cmap).

`--bench FILE` adds the training-step time and peak memory of each row's methods relative to full
fine-tuning, read from a `benchmarks/peft_step.py` result (e.g. `--model whisper-tiny-en`:
`peft_step_whisper-tiny-en.json`), matched on the methods of the row's recipe (`model.methods`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from shared.report import collect, main as generic


def _methods_key(methods) -> str:
    return json.dumps(methods, sort_keys=True)


def bench_columns(path: str | Path):
    """[(header, cell(summary entry) -> str)]: step time and peak RSS vs full fine-tuning of the
    benchmark row whose methods equal the entry's recipe `model.methods` ("-" where none does)."""
    path = Path(path)
    try:
        res = json.loads(path.read_text())
        rows = res["train_step"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--bench {path}: not a benchmarks/peft_step.py result ({type(e).__name__}: {e})") from None
    by_methods = {}
    for r in rows:
        if "error" in r or "step_ratio" not in r:
            continue
        methods = r.get("method")
        if r.get("key") == "full" and methods is None:  # the generic benchmark's full row: every tensor trains
            methods = [{"name": "full"}]
        by_methods[_methods_key(methods if isinstance(methods, list) else [methods])] = r
    load = res.get("config", {}).get("loadavg_start", "?")

    def row(s):
        recipe = s.get("recipe") or {}
        text = recipe.get("model.methods")
        if text is None:
            return None
        return by_methods.get(_methods_key(json.loads(text)))

    def cell(key):
        return lambda s: f"{row(s)[key]:.2f}x" if row(s) is not None else "-"

    return [(f"step vs full ({path.name}, load {load})", cell("step_ratio")), ("peak RSS vs full", cell("peak_rss_ratio"))]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    columns = None
    if "--bench" in argv:
        i = argv.index("--bench")
        if i + 1 >= len(argv):
            raise ValueError("--bench needs a file (a benchmarks/peft_step.py result JSON)")
        columns = bench_columns(argv[i + 1])
        del argv[i:i + 2]
    runs = next((a for a in argv if not a.startswith("-")), None)
    probe_runs = runs is not None and any(str(r.get("method", "")).endswith("_probe") for r in collect(runs))
    if probe_runs:
        from audio.birds import report as bird_report

        metric = argv[argv.index("--metric") + 1] if "--metric" in argv else "test/cmap"
        bird_report.main([runs, "--metric", metric])
        if "--metric" not in argv:
            argv += ["--metric", metric]
    generic(argv, columns=columns)


if __name__ == "__main__":
    from shared.cli import friendly

    sys.exit(friendly(main))
