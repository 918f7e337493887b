"""Issue 17, item 21: the report plot reads on its own. One run per method: labelled hollow markers
that say "1 run" (no lone dot with an invisible error bar); several runs: mean ± std; axes with
units; a single point gets a readable range. Checked on the figure's artists (Agg)."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from shared import report


def _summary(tmp_path, rows, metric="test/acc"):
    for i, r in enumerate(rows):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"dataset": "esc50", "backbone": "ast", "total_params": 10_000,
                                                    "run": f"r{i}", **r}))
    return report.summarise(report.collect(tmp_path), metric)


def test_one_run_per_method_gets_labelled_markers_that_say_1_run(tmp_path):
    s = _summary(tmp_path, [{"method": "lora", "test/acc": 0.8, "trainable_params": 3200},
                            {"method": "full", "test/acc": 0.85, "trainable_params": 10_000}])
    fig = report.figure(s, "test/acc")
    try:
        ax = fig.axes[0]
        assert sorted(t.get_text() for t in ax.texts) == ["full (1 run)", "lora (1 run)"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["esc50: full (ast): 1 run",
                                                                        "esc50: lora (ast): 1 run"]
        assert not ax.containers  # no error bars: nothing to spread
        assert all(line.get_markerfacecolor() == "white" and line.get_marker() == "D" for line in ax.lines)
        assert ax.get_xlabel() == "trainable parameters (count, log scale)" and ax.get_xscale() == "log"
        assert ax.get_ylabel() == "test/acc (%)"
        assert ax.get_title() == "test/acc against trainable parameters: 2 row(s) of the table, 2 runs"
    finally:
        plt.close(fig)


def test_several_runs_are_a_mean_with_a_std_bar(tmp_path):
    s = _summary(tmp_path, [{"method": "lora", "test/acc": v, "trainable_params": 3200, "fold": i}
                            for i, v in enumerate([0.8, 0.9])])
    fig = report.figure(s, "test/acc")
    try:
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.texts] == ["lora (2 runs)"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["esc50: lora (ast): 2 runs, mean ± std"]
        (bar,) = ax.containers
        (segment,) = bar.lines[2][0].get_segments()
        assert [y for _, y in segment] == pytest.approx([80.0, 90.0])  # mean 85 ± population std 5, in %
    finally:
        plt.close(fig)


def test_a_single_point_gets_a_readable_range_and_the_metrics_unit(tmp_path):
    s = _summary(tmp_path, [{"method": "unet", "test/hd95": 12.5, "units": {"test/hd95": "mm"}, "trainable_params": 500}],
                 "test/hd95")
    fig = report.figure(s, "test/hd95")
    try:
        ax = fig.axes[0]
        assert ax.get_ylabel() == "test/hd95 (mm)"
        assert ax.get_xlim() == pytest.approx((50, 5000))  # a decade either side of the one count
        lo, hi = ax.get_ylim()
        assert lo < 12.5 < hi and hi - lo == pytest.approx(2.5)
        assert [t.get_text() for t in ax.texts] == ["unet (1 run)"]
    finally:
        plt.close(fig)


def test_rows_without_a_parameter_count_are_said_not_drawn(tmp_path):
    s = _summary(tmp_path, [{"method": "lora", "test/acc": 0.8}])
    fig = report.figure(s, "test/acc")
    try:
        ax = fig.axes[0]
        assert "1 without a parameter count not drawn" in ax.get_title()
        assert [t.get_text() for t in ax.texts] == ["no row records its trainable parameters"]
    finally:
        plt.close(fig)
