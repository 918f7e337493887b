"""`python -m audio.report RUNS [--metric M]`: the results table (mean +- std over folds / seeds of
one recipe) and the metric-vs-parameters plot. When RUNS holds probe runs of `audio.probe`
(bioacoustics), it also writes the test-set x probe-kind table and grouped bar chart
(`audio.birds.report`; default metric test/cmap)."""
from __future__ import annotations

import sys

from shared.report import collect, main as generic


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    runs = next((a for a in argv if not a.startswith("-")), None)
    probe_runs = runs is not None and any(str(r.get("method", "")).endswith("_probe") for r in collect(runs))
    if probe_runs:
        from audio.birds import report as bird_report

        metric = argv[argv.index("--metric") + 1] if "--metric" in argv else "test/cmap"
        bird_report.main([runs, "--metric", metric])
        if "--metric" not in argv:
            argv += ["--metric", metric]
    generic(argv)


if __name__ == "__main__":
    from shared.cli import friendly

    sys.exit(friendly(main))
