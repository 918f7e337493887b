"""`python -m text.report RUNS`: the text domain's tables from run folders (every run's metrics.json).

- per dataset / domain (ACTER `acter-<domain>` rows are the held-out domains): `report-test-f1.md` +
  `report-test-f1.png` (F1 against trainable parameters), through `shared.report`;
- per reader (personalised runs): `report-readers.md`, one row per run, one column per reader, and
  the macro F1 over readers;
- the ACTER method table (runs with bootstrap intervals, `data.bootstrap`): `report-methods.md`, one
  row per held-out domain x regime x learning rate (`method_table`).

Both name the metric definition each run followed (`definition` in metrics.json: "reference", or
the option, e.g. `term_match=term_key`; docs/metrics.md); runs of different definitions are never
averaged into one row.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared import report as R
from shared.fs import atomic_write

PREFIX = "test/f1_reader/"
BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "peft_step_minilm.json"
REGIME_ORDER = ("full", "lora", "adapter", "bitfit", "linear_probe")


def reader_table(rows: list[dict]) -> str:
    rows = [r for r in rows if any(k.startswith(PREFIX) for k in r)]
    if not rows:
        return ""
    readers = sorted({k[len(PREFIX):] for r in rows for k in r if k.startswith(PREFIX)})
    head = ["run", "dataset", "method", "metric definition"] + readers + ["macro F1", "micro F1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (str(r.get("dataset")), str(r.get("run")))):
        cells = [str(r.get("run")), str(r.get("dataset")), str(r.get("method")), str(r.get("definition") or "unrecorded")]
        cells += [f"{100 * r[PREFIX + who]:.1f}" if PREFIX + who in r else "" for who in readers]
        cells += [f"{100 * r[k]:.1f}" if isinstance(r.get(k), (int, float)) else "" for k in ("test/macro_f1", "test/f1")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _methods(row: dict) -> list[dict]:
    return list(((row.get("config") or {}).get("model") or {}).get("methods") or [])


def _canonical(method: dict) -> str:
    """A method config with its defaults filled in (the core's dataclass), as comparable JSON."""
    from shared import peft

    return json.dumps(peft.from_dict(dict(method)).to_dict(), sort_keys=True, default=str)


def regime_name(methods: list[dict]) -> str:
    """A readable name of what trained: `LoRA r8 on query,key,value,dense`, `adapter ffn parallel b64`, ..."""
    if not methods:
        return "frozen encoder + token head (linear probe)"
    names = []
    for m in methods:
        if m["name"] == "lora":
            t = m.get("targets")
            names.append(f"LoRA r{m.get('r', 8)} on {','.join(t) if isinstance(t, list) else t}")
        elif m["name"] == "adapter":
            size = f"b{m['bottleneck']}" if m.get("bottleneck") else f"RR{m.get('reduction', 12)}"
            names.append(f"adapter {m.get('placement', 'both')} {m.get('mode', 'parallel')} {size}")
        elif m["name"] == "full":
            names.append("full fine-tuning")
        elif m["name"] == "bitfit":
            names.append("BitFit")
        else:
            names.append(m["name"])
    return " + ".join(names)


def bench_rows(path: Path = BENCH) -> dict[str, dict]:
    """benchmarks/results/peft_step_minilm.json's training-step rows without recomputation or block
    subsets, keyed by the canonical method config ("full" / "linear_probe" for those two)."""
    if not Path(path).is_file():
        return {}
    out = {}
    for r in json.loads(Path(path).read_text()).get("train_step", []):
        if r["key"] in ("full", "linear_probe"):
            out[r["key"]] = r
        elif r.get("method") and "recompute" not in r["key"] and "blocks" not in r["method"] \
                and isinstance(r["method"].get("targets", []), list):
            out[_canonical(r["method"])] = r
    return out


def bench_row(methods: list[dict], bench: dict[str, dict]) -> dict | None:
    if not methods:
        return bench.get("linear_probe")
    if len(methods) == 1 and methods[0]["name"] == "full":
        return bench.get("full")
    return bench.get(_canonical(methods[0])) if len(methods) == 1 else None


def _ci(r: dict, m: str) -> str:
    v, lo, hi = r.get(f"test/{m}"), r.get(f"test/{m}_lo"), r.get(f"test/{m}_hi")
    if not isinstance(v, (int, float)):
        return "-"
    return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" if isinstance(lo, (int, float)) else f"{100 * v:.1f}"


def _test_terms(row: dict) -> dict | None:
    f = Path(row.get("_path", "")).parent / "test_terms.json"
    return json.loads(f.read_text()) if row.get("_path") and f.is_file() else None


def rescored(row: dict) -> dict:
    """A run that saved its per-sentence terms gets its intervals recomputed from them with this code
    (`text.bootstrap.term_bootstrap`, the run's resample count and data seed), so every row of the
    table follows one interval definition; the full-set values must agree with its metrics.json."""
    from text.bootstrap import term_bootstrap

    t = _test_terms(row)
    if not t:
        return row
    seed = (((row.get("config") or {}).get("data") or {}).get("init_args") or {}).get("seed", 0)
    ci = term_bootstrap([set(x) for x in t["pred"]], [set(x) for x in t["gold_by_sentence"]], set(t["gold"]),
                        resamples=int(row.get("test/bootstrap_resamples") or 1000), seed=seed)
    for m in ("precision", "recall", "f1"):
        if abs(ci[m] - row[f"test/{m}"]) > 1e-6:
            raise ValueError(f"{row.get('_path')}: test_terms.json gives {m} {ci[m]:.6f}, metrics.json {row[f'test/{m}']:.6f}")
    return {**row, **{f"test/{k}": v for k, v in ci.items() if k not in ("precision", "recall", "f1")}}


def paired_to_best(rows: list[dict], chosen: set[int], groups: dict) -> dict[int, str]:
    """Per run (by id): its F1 minus the best run's of its domain, with the paired interval ("best" for
    that run); only runs that wrote test_terms.json, on the same sentences and gold terms."""
    from text.bootstrap import term_difference

    out: dict[int, str] = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        runs = [r for r in rows if r["dataset"] == dataset and (len(groups[(dataset, json.dumps(_methods(r), sort_keys=True))]) == 1
                                                               or id(r) in chosen)]
        terms = {id(r): _test_terms(r) for r in runs}
        runs = [r for r in runs if terms[id(r)]]
        if len(runs) < 2:
            continue
        best = max(runs, key=lambda r: r["test/f1"])
        ref = terms[id(best)]
        out[id(best)] = "best"
        for r in runs:
            t = terms[id(r)]
            if r is best or t["doc_ids"] != ref["doc_ids"] or t["gold"] != ref["gold"]:
                continue
            d = term_difference([set(x) for x in t["pred"]], [set(x) for x in ref["pred"]],
                                [set(x) for x in ref["gold_by_sentence"]], set(ref["gold"]),
                                resamples=int(r.get("test/bootstrap_resamples") or 1000))
            out[id(r)] = f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
    return out


def method_table(rows: list[dict], bench_path: Path = BENCH) -> str:
    """ACTER runs with bootstrap intervals: one row per run (held-out domain x regime x lr): F1 /
    precision / recall with their 95% intervals over test sentences, predicted / gold terms, trainable
    parameters, the step-time and peak-memory ratios to full fine-tuning from `benchmarks/results/
    peft_step_minilm.json` (its row of the same method config; '-' where it has none), validation F1 of
    the tested epoch (what an lr grid chooses on) and the run's CPU time. Where one domain and regime ran
    with several learning rates, the run of the best validation F1 is marked chosen."""
    rows = [rescored(r) for r in rows if str(r.get("dataset", "")).startswith("acter-") and "test/f1_lo" in r]
    if not rows:
        return ""
    bench = bench_rows(bench_path)
    order = {k: i for i, k in enumerate(REGIME_ORDER)}

    def regime_key(r):
        ms = _methods(r)
        return "linear_probe" if not ms else ms[0]["name"]

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], json.dumps(_methods(r), sort_keys=True)), []).append(r)
    chosen = {id(max(g, key=lambda r: r.get("val/f1_best", -1.0))) for g in groups.values() if len(g) > 1}
    diffs = paired_to_best(rows, chosen, groups)
    head = ["held-out domain", "regime", "lr", "F1 % [95% CI]", "precision %", "recall %", "F1 - best (paired 95% CI)",
            "predicted / gold", "trainable params", "step vs full", "peak RSS vs full", "above baseline vs full",
            "val F1 %", "CPU min (threads)", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows.sort(key=lambda r: (r["dataset"] != "acter-htfl", r["dataset"], order.get(regime_key(r), 99), float((r["config"].get("model") or {})
                                                                              .get("lr", 0)), str(r.get("run"))))
    missing = set()
    for r in rows:
        ms, lr = _methods(r), (r["config"].get("model") or {}).get("lr")
        b = bench_row(ms, bench)
        name = regime_name(ms)
        if b is None:
            missing.add(name)
        group = groups[(r["dataset"], json.dumps(ms, sort_keys=True))]
        mark = "" if len(group) == 1 else (" (chosen on val)" if id(r) in chosen else " (not chosen)")
        cpu = r.get("cpu_seconds")
        cells = [r["dataset"].removeprefix("acter-"), name + mark, f"{lr:g}" if isinstance(lr, (int, float)) else "-",
                 _ci(r, "f1"), _ci(r, "precision"), _ci(r, "recall"), diffs.get(id(r), "-"),
                 f"{r.get('test/n_predicted', 0):,.0f} / {r.get('test/n_gold', 0):,.0f}",
                 f"{r.get('trainable_params', 0):,}",
                 *(f"{b[k]:.2f}x" if b else "-" for k in ("step_ratio", "peak_rss_ratio", "peak_above_baseline_ratio")),
                 f"{100 * r['val/f1_best']:.1f}" if isinstance(r.get("val/f1_best"), (int, float)) else "-",
                 (f"{cpu / 60:.1f}" if isinstance(cpu, (int, float)) else "-") + f" ({r.get('torch_threads', '?')})",
                 str(r.get("run"))]
        lines.append("| " + " | ".join(cells) + " |")
    n = sorted({int(r.get("test/bootstrap_resamples", 0)) for r in rows})
    shifts = {m: [100 * r[f"test/{m}_shift"] for r in rows if isinstance(r.get(f"test/{m}_shift"), (int, float))]
              for m in ("precision", "recall", "f1")}
    shown = ", ".join(f"{m} {min(v):+.1f} to {max(v):+.1f}" for m, v in shifts.items() if v)
    notes = [f"Intervals: 95% bootstrap over the held-out domain's test sentences ({'/'.join(map(str, n))} seeded "
             f"resamples drawn by shared.bootstrap; text.bootstrap): each resample is scored as a corpus (its "
             f"predicted and gold term sets); the point value is the full test set's TermEval score. A resample holds "
             f"~63% distinct sentences, which moves set-level scores (resample median minus full-set value, points: "
             f"{shown or 'not recorded'}), so the interval is the resamples' 2.5-97.5 percentile spread placed around "
             f"the full-set value."]
    if bench:
        cfg = json.loads(Path(bench_path).read_text()).get("config", {})
        notes.append(f"Ratios to full fine-tuning: {Path(bench_path).name} (training step, batch {cfg.get('batch')} x "
                     f"{cfg.get('seq')} tokens, {cfg.get('threads')} thread(s), a mean-pooled classification head), "
                     f"the row of the same method config.")
    if missing:
        notes.append("The benchmark has no row for: " + "; ".join(sorted(missing)) + " ('-').")
    if diffs:
        notes.append("F1 - best: each run's F1 minus that of the domain's best run (by test F1, among the runs a "
                     "grid chose), both scored on the same resampled sentences (text.bootstrap.term_difference, "
                     "from the runs' test_terms.json); an interval that excludes 0 is a difference the test "
                     "sentences support.")
    notes.append("CPU min: the training process's CPU time for fit + test (`cpu_seconds`), torch threads in brackets.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m text.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="folder searched recursively for metrics.json (e.g. runs/text_demo)")
    ap.add_argument("--metric", default="test/f1", help="metric of the per-dataset table (test/f1)")
    ap.add_argument("--bench", default=str(BENCH), help="step benchmark JSON the method table takes its time and "
                                                        "memory ratios from (benchmarks/results/peft_step_minilm.json)")
    args = ap.parse_args(argv)
    rows = R.collect(args.runs)
    if not rows:
        raise ValueError(f"{args.runs}: no metrics.json found under it")
    summary = R.summarise(rows, args.metric)
    if not summary:
        raise ValueError(f"{args.runs}: no run reports {args.metric!r}")
    table = R.markdown(summary, args.metric)
    atomic_write(Path(args.runs) / f"report-{R.slug(args.metric)}.md", table)
    R.plot(summary, args.metric, Path(args.runs) / f"report-{R.slug(args.metric)}.png")
    readers = reader_table(rows)
    out = table
    methods = method_table(rows, Path(args.bench))
    if methods:
        atomic_write(Path(args.runs) / "report-methods.md", methods)
        out += "\nACTER method table (report-methods.md):\n\n" + methods
    if readers:
        atomic_write(Path(args.runs) / "report-readers.md", readers)
        out += "\nper reader (test F1 of the jargon class, %):\n\n" + readers
    print(out)
    return out


if __name__ == "__main__":
    from shared.cli import friendly

    sys.exit(friendly(main))
