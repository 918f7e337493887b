"""`python -m medical.report runs/medical [--metric test/acc|test/auroc|test/dice]`: table + metric-vs-parameters plot.

`python -m medical.report RUNS --study [--out FILE.md] [--plot FILE.png]`: the method table of
`medical.study run` (test accuracy / AUROC with 95% bootstrap intervals, trainable parameters,
step time and memory relative to full fine-tuning, CPU time) and the few-shot figure.
"""
import sys

from shared.report import main as table_main


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--study" not in argv:
        return table_main(argv)
    import argparse

    from medical.study import report

    ap = argparse.ArgumentParser(prog="python -m medical.report", description="the study's method table + few-shot figure")
    ap.add_argument("runs")
    ap.add_argument("--study", action="store_true", required=True)
    ap.add_argument("--out", default=None, help="Markdown file (default RUNS/study.md)")
    ap.add_argument("--plot", default=None, help="PNG file (default RUNS/fewshot.png)")
    ap.add_argument("--bench", default=None, help="peft_step JSON (default benchmarks/results/peft_step_dinov2-s14.json)")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    return report(a.runs, a.out, a.plot, a.bench, a.resamples, a.seed)


if __name__ == "__main__":
    from shared.cli import friendly

    sys.exit(friendly(main))
