"""`python -m text.report RUNS`: the text domain's tables from run folders (every run's metrics.json).

- per dataset / domain (ACTER `acter-<domain>` rows are the held-out domains): `report-test-f1.md` +
  `report-test-f1.png` (F1 against trainable parameters), through `shared.report`;
- per reader (personalised runs): `report-readers.md`, one row per run, one column per reader, and
  the macro F1 over readers.

Both name the metric definition each run followed (`definition` in metrics.json: "reference", or
the option, e.g. `term_match=term_key`; docs/metrics.md); runs of different definitions are never
averaged into one row.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared import report as R
from shared.fs import atomic_write

PREFIX = "test/f1_reader/"


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


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m text.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="folder searched recursively for metrics.json (e.g. runs/text_demo)")
    ap.add_argument("--metric", default="test/f1", help="metric of the per-dataset table (test/f1)")
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
    if readers:
        atomic_write(Path(args.runs) / "report-readers.md", readers)
        out += "\nper reader (test F1 of the jargon class, %):\n\n" + readers
    print(out)
    return out


if __name__ == "__main__":
    from shared.cli import friendly

    sys.exit(friendly(main))
