"""shared.report: gathering hand-written metrics.json rows from nested run folders into a
mean +- population-std table per recipe (runs without a saved recipe: per dataset, method, shots,
backbone), the Markdown table, the plot, and the `main` entry (atomic report-<metric>.md,
printed table, clear exits)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from shared import report

TOTAL = 32_000


def row(dataset, method, fold, acc=None, few_shot=None, trainable=3_200, **extra):
    r = {"run": f"{dataset}_{method}_{fold}", "backbone": "tiny-ast", "dataset": dataset, "fold": fold,
         "few_shot": few_shot, "method": method, "trainable_params": trainable, "total_params": TOTAL, **extra}
    if acc is not None:
        r["test/acc"] = acc
    return r


def put(root: Path, rel: str, data) -> Path:
    p = root / rel / "metrics.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


@pytest.fixture
def runs(tmp_path) -> Path:
    """Nested run folders as sweeps leave them, plus what must NOT be counted."""
    root = tmp_path / "runs"
    # esc50 / lora over 3 folds (at different depths): 0.8, 0.9, 1.0 -> 90.00 +- 8.16 (population std)
    put(root, "esc50/lora/fold1", row("esc50", "lora", 1, 0.8))
    put(root, "esc50/lora/fold2", row("esc50", "lora", 2, 0.9))
    put(root, "esc50/lora/seed0/extra/fold3", row("esc50", "lora", 3, 1.0))
    # esc50 / full over 2 folds: 0.5, 0.7 -> 60.00 +- 10.00 (population std)
    put(root, "esc50/full/fold1", row("esc50", "full", 1, 0.5, trainable=TOTAL))
    put(root, "esc50/full/fold2", row("esc50", "full", 2, 0.7, trainable=TOTAL))
    # esc50 / lora 5-shot: a separate group; one run -> std 0
    put(root, "esc50/lora_5shot/fold1", row("esc50", "lora", 1, 0.4, few_shot=5))
    # us8k / lora: another dataset, same method
    put(root, "us8k/lora/fold1", row("us8k", "lora", 1, 0.75, trainable=1_600))
    # a run that reports another metric only: not in the test/acc table
    put(root, "esc50/multilabel/fold1", row("esc50", "bitfit", 1, **{"test/map": 0.3}))
    # unfinished runs (staging folders of shared.cli) must be ignored, at any depth
    put(root, ".x.staging-abc123", row("esc50", "lora", 4, 0.0))
    put(root, "esc50/lora/.fold5.staging-q1w2e3", row("esc50", "lora", 5, 0.0))
    put(root, "esc50/.full.old-4242", row("esc50", "full", 3, 0.0))
    return root


def test_collect_reads_nested_runs_and_ignores_hidden_folders(runs):
    rows = report.collect(runs)
    assert len(rows) == 8
    assert not any("staging" in r["_path"] or ".old-" in r["_path"] for r in rows)
    assert 0.0 not in [r.get("test/acc") for r in rows]
    assert {Path(r["_path"]).name for r in rows} == {"metrics.json"}
    assert all(Path(r["_path"]).is_file() for r in rows)


def test_collect_on_a_relative_root(runs, monkeypatch):
    monkeypatch.chdir(runs.parent)
    assert len(report.collect("runs")) == 8
    assert len(report.collect("./runs/")) == 8


def test_summarise_mean_and_population_std_per_group(runs):
    summary = report.summarise(report.collect(runs), "test/acc")
    by = {(s["dataset"], s["method"], s["few_shot"]): s for s in summary}
    assert set(by) == {("esc50", "lora", None), ("esc50", "full", None), ("esc50", "lora", 5), ("us8k", "lora", None)}

    lora = by[("esc50", "lora", None)]
    assert lora["runs"] == 3 and lora["folds"] == [1, 2, 3]
    assert lora["mean"] == pytest.approx((0.8 + 0.9 + 1.0) / 3)
    assert lora["std"] == pytest.approx(math.sqrt(((0.8 - 0.9) ** 2 + 0 + (1.0 - 0.9) ** 2) / 3))  # divide by n
    assert lora["trainable_params"] == 3_200 and lora["trainable_percent"] == pytest.approx(10.0)

    full = by[("esc50", "full", None)]
    assert full["runs"] == 2 and full["mean"] == pytest.approx(0.6) and full["std"] == pytest.approx(0.1)
    assert full["trainable_percent"] == pytest.approx(100.0)

    shots = by[("esc50", "lora", 5)]
    assert shots["runs"] == 1 and shots["mean"] == pytest.approx(0.4) and shots["std"] == 0.0
    assert by[("us8k", "lora", None)]["trainable_percent"] == pytest.approx(5.0)

    # another metric: only the runs that report it
    maps = report.summarise(report.collect(runs), "test/map")
    assert [(s["dataset"], s["method"], s["runs"], s["mean"]) for s in maps] == [("esc50", "bitfit", 1, 0.3)]
    assert report.summarise(report.collect(runs), "test/f1") == []


HEAD = ("| dataset | method | backbone | shots | runs (folds) | test/acc % (mean ± std) | trainable params "
        "| % of total | run names |")


def test_markdown_rows(runs):
    table = report.markdown(report.summarise(report.collect(runs), "test/acc"), "test/acc")
    lines = table.splitlines()
    assert table.endswith("\n")
    assert lines[0] == HEAD
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|"
    assert lines[2:6] == [
        "| esc50 | full | tiny-ast | all | 2 (1,2) | 60.00 ± 10.00 | 32,000 | 100.000 | esc50_full_1, esc50_full_2 |",
        "| esc50 | lora | tiny-ast | 5 | 1 (1) | 40.00 ± 0.00 | 3,200 | 10.000 | esc50_lora_1 |",
        "| esc50 | lora | tiny-ast | all | 3 (1,2,3) | 90.00 ± 8.16 | 3,200 | 10.000 | esc50_lora_1, esc50_lora_2, esc50_lora_3 |",
        "| us8k | lora | tiny-ast | all | 1 (1) | 75.00 ± 0.00 | 1,600 | 5.000 | us8k_lora_1 |",
    ]
    assert "population std" in lines[-1]


def test_markdown_without_folds(tmp_path):
    put(tmp_path, "a", {**row("esc50", "lora", None, 0.5), "fold": None})
    put(tmp_path, "b", {k: v for k, v in row("esc50", "lora", None, 0.7).items() if k != "fold"})
    table = report.markdown(report.summarise(report.collect(tmp_path), "test/acc"), "test/acc")
    assert table.splitlines()[2] == "| esc50 | lora | tiny-ast | all | 2 (-) | 60.00 ± 10.00 | 3,200 | 10.000 | esc50_lora_None, esc50_lora_None |"


def test_plot_writes_a_png(runs, tmp_path):
    out = tmp_path / "plot.png"
    report.plot(report.summarise(report.collect(runs), "test/acc"), "test/acc", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["plot.png"]  # no temporary left


@pytest.mark.parametrize("content", ['{"test/acc": 0.', "", "\x00\x01garbage\x02", "[1, 2]", "null"],
                         ids=["truncated", "empty", "text_garbage", "json_list", "json_null"])
def test_corrupt_metrics_file_is_a_value_error_naming_it(tmp_path, content):
    put(tmp_path, "esc50/lora/fold1", row("esc50", "lora", 1, 0.8))
    bad = put(tmp_path, "esc50/lora/fold2", content)
    with pytest.raises(ValueError, match="fold2") as e:
        report.collect(tmp_path)
    assert str(bad) in str(e.value)


def test_binary_metrics_file_is_a_value_error_naming_it(tmp_path):
    """A metrics.json that is not UTF-8 (a torn write on a crashed disk, a stray binary)."""
    put(tmp_path, "esc50/lora/fold1", row("esc50", "lora", 1, 0.8))
    bad = tmp_path / "esc50" / "lora" / "fold2" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x85\xff\xfe" + bytes(range(256)))
    with pytest.raises(ValueError) as e:
        report.collect(tmp_path)
    assert str(bad) in str(e.value)


def test_main_writes_report_atomically_and_prints_the_table(runs, capsys):
    old = runs / "report-test-acc.md"
    old.write_text("previous report\n")
    table = report.main([str(runs)])
    out = capsys.readouterr().out
    assert out.startswith(table) and f"report written to {runs / 'report-test-acc.md'}" in out
    assert (runs / "report-test-acc.md").read_text() == table
    assert "| esc50 | lora | tiny-ast | all | 3 (1,2,3) | 90.00 ± 8.16 | 3,200 | 10.000 |" in table
    assert (runs / "report-test-acc.png").read_bytes()[:4] == b"\x89PNG"
    # only the two results appear at the top: no temporary files left beside them
    assert sorted(p.name for p in runs.iterdir() if p.is_file()) == ["report-test-acc.md", "report-test-acc.png"]
    # running again (report files present) gives the same table
    assert report.main([str(runs)]) == table
    # a second metric does not overwrite the first
    report.main([str(runs), "--metric", "test/map"])
    assert (runs / "report-test-acc.md").read_text() == table
    assert sorted(p.name for p in runs.iterdir() if p.is_file()) == [
        "report-test-acc.md", "report-test-acc.png", "report-test-map.md", "report-test-map.png"]


def test_main_options(runs, tmp_path, capsys):
    out, png = tmp_path / "out" / "table.md", tmp_path / "fig.png"
    out.parent.mkdir()
    table = report.main([str(runs), "--metric", "test/map", "--out", str(out), "--plot", str(png)])
    assert out.read_text() == table and "test/map % (mean ± std)" in table
    assert "| esc50 | bitfit | tiny-ast | all | 1 (1) | 30.00 ± 0.00 |" in table
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not list(runs.glob("report*"))
    capsys.readouterr()
    # the default metric of a domain entry point
    assert report.main([str(runs), "--out", str(out), "--plot", str(png)], default_metric="test/map") == table


def test_audio_report_gives_the_generic_table_for_training_runs(runs, tmp_path):
    """`python -m audio.report` on audio.train runs writes exactly the shared report (the probe-kinds
    table is added only for audio.probe runs: tests/bioacoustic)."""
    import audio.report

    want = report.main([str(runs), "--out", str(tmp_path / "want.md"), "--plot", str(tmp_path / "want.png")])
    audio.report.main([str(runs)])
    assert (runs / "report-test-acc.md").read_text() == want
    assert not list(runs.glob("bird-report*"))


def test_no_metrics_is_a_clear_exit(tmp_path):
    (tmp_path / "empty" / ".x.staging-1").mkdir(parents=True)
    put(tmp_path / "empty", ".x.staging-1", row("esc50", "lora", 1, 0.8))  # hidden: does not count
    with pytest.raises(SystemExit, match=r"no metrics\.json found under .*empty"):
        report.main([str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="no metrics.json found"):
        report.main([str(tmp_path / "does_not_exist")])
    assert not (tmp_path / "empty" / "report.md").exists()


def test_no_run_reports_the_metric_is_a_clear_exit(runs):
    (runs / "report-test-f1.md").write_text("previous report\n")
    with pytest.raises(SystemExit, match=r"no run under .* reports 'test/f1' \(they report: test/acc, test/map\)"):
        report.main([str(runs), "--metric", "test/f1"])
    assert (runs / "report-test-f1.md").read_text() == "previous report\n"  # untouched
    assert sorted(p.name for p in runs.iterdir() if p.is_file()) == ["report-test-f1.md"]


def test_report_md_is_replaced_not_rewritten_in_place(runs, monkeypatch):
    """report.md is swapped in with os.replace from a file in the same folder (atomic)."""
    calls = []
    real = os.replace

    def spy(src, dst):
        calls.append((Path(src), Path(dst)))
        assert Path(src).parent == Path(dst).parent
        return real(src, dst)

    monkeypatch.setattr(report.os, "replace", spy)
    report.main([str(runs)])
    assert runs / "report-test-acc.md" in [d for _, d in calls] and runs / "report-test-acc.png" in [d for _, d in calls]


def test_report_files_get_ordinary_permissions(runs):
    """report.md / report.png are written with tempfile.mkstemp, which creates files 0600, and
    os.replace keeps that mode: the report of a shared runs folder is unreadable to the group and
    other users (runs/report.md in this checkout is -rw-------). They should get the mode a plain
    open() gives under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    report.main([str(runs)])
    for name in ("report-test-acc.md", "report-test-acc.png"):
        assert (runs / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def _cfg(lr=1e-3, epochs=10, fold=1, seed=0):
    return {"seed_everything": seed, "model": {"backbone": "tiny-ast", "lr": lr},
            "data": {"class_path": "audio.datasets.ESC50DataModule", "init_args": {"test_fold": fold, "root": "/d"}},
            "trainer": {"max_epochs": epochs}}


def test_runs_of_different_recipes_are_not_averaged(tmp_path):
    """Issue 8.6: lr 1e-3 / 10 epochs and lr 3e-3 / 20 epochs were averaged as if they were folds."""
    put(tmp_path, "a1", {**row("esc50", "lora", 1, 0.80), "run": "a1", "config": _cfg(fold=1, seed=0)})
    put(tmp_path, "a2", {**row("esc50", "lora", 2, 0.90), "run": "a2", "config": _cfg(fold=2, seed=1)})
    put(tmp_path, "b1", {**row("esc50", "lora", 1, 0.50), "run": "b1", "config": _cfg(3e-3, 20, fold=1)})
    summary = report.summarise(report.collect(tmp_path), "test/acc")
    assert [(s["run_names"], round(s["mean"], 4)) for s in summary] == [(["a1", "a2"], 0.85), (["b1"], 0.5)]
    labels = [s["label"] for s in summary]
    assert len(set(labels)) == 2
    assert labels == ["esc50: lora (tiny-ast) [lr=0.001, max_epochs=10]", "esc50: lora (tiny-ast) [lr=0.003, max_epochs=20]"]
    table = report.markdown(summary, "test/acc")
    assert "| recipe |" in table.splitlines()[0] and "| lr=0.003, max_epochs=20 |" in table
    png = tmp_path / "p.png"
    report.plot(summary, "test/acc", png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_probe_head_size_does_not_split_a_recipe(tmp_path):
    """Issue 13.9: seeds that choose different probe features (head sizes) are one recipe."""
    for seed, (trainable, acc) in enumerate([(130, 0.7), (514, 0.8)]):
        cfg = {"seed_everything": seed, "backbone": "dinov2", "epochs": 10}
        put(tmp_path, f"s{seed}", {**row("medmnist", "linear_probe_grid", None, acc, trainable=trainable),
                                   "run": f"s{seed}", "backbone": "dinov2", "config": cfg})
    (s,) = report.summarise(report.collect(tmp_path), "test/acc")
    assert s["runs"] == 2 and s["mean"] == pytest.approx(0.75) and s["std"] == pytest.approx(0.05)
    assert "| medmnist | linear_probe_grid | dinov2 | all | 2 (-) | 75.00 ± 5.00 | 130-514 |" in report.markdown([s], "test/acc")


def test_only_fraction_metrics_are_scaled_to_percent(tmp_path):
    """Issue 13.9: HD95 of 3-5 px showed as "400.00 +- 141.42" with a (%) axis."""
    put(tmp_path, "a", {**row("lungs", "linear", 1), "test/hd95": 3.0, "test/dice": 0.7})
    put(tmp_path, "b", {**row("lungs", "linear", 2), "test/hd95": 5.0, "test/dice": 0.9})
    rows = report.collect(tmp_path)
    hd = report.markdown(report.summarise(rows, "test/hd95"), "test/hd95")
    assert "| test/hd95 (mean ± std) |" in hd and "| 4.00 ± 1.00 |" in hd and "Values in %" not in hd
    dice = report.markdown(report.summarise(rows, "test/dice"), "test/dice")
    assert "| test/dice % (mean ± std) |" in dice and "| 80.00 ± 10.00 |" in dice
    assert not report.is_fraction("test/loss", [{"mean": 0.5, "values": [0.5]}])


def test_units_saved_with_a_run_label_the_column(tmp_path):
    put(tmp_path, "a", {**row("lungs", "linear", 1), "test/hd95": 3.0, "units": {"test/hd95": "px (model input)"}})
    table = report.markdown(report.summarise(report.collect(tmp_path), "test/hd95"), "test/hd95")
    assert "| test/hd95 (px (model input)) (mean ± std) |" in table and "| 3.00 ± 0.00 |" in table
