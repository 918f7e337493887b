"""vision.report compares a run only with single-task baselines scored under the same metric definition."""
from __future__ import annotations

import json

import pytest

from vision import report


def row(name, tasks, values, definition=None, method="polyhistor"):
    r = {"run_name": name, "method": method, "tasks": tasks, "primary": {t: "miou" for t in tasks},
         "lower_is_better": {t: False for t in tasks}, "test": {t: {"miou": v} for t, v in zip(tasks, values)},
         "params": {"trainable": 10}}
    if definition is not None:  # runs written before definitions were recorded have none
        r["definition"] = {t: definition for t in tasks}
    return r


def test_delta_m_never_mixes_definitions(tmp_path):
    runs = {"single_ref": row("single_ref", ["semseg"], [0.5], "reference", "full"),
            "single_old": row("single_old", ["semseg"], [0.8], None, "full"),
            "multi_ref": row("multi_ref", ["semseg", "human_parts"], [0.55, 0.3], "reference"),
            "multi_old": row("multi_old", ["semseg"], [0.88], None)}
    for name, r in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(r))
    rows = report.read_runs(tmp_path)
    base = report.baselines(rows, "full")
    assert base == {("semseg", "reference"): 0.5, ("semseg", "present_classes"): 0.8}
    text, points = report.table(rows, base, "full")
    lines = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines()[2:]}
    assert lines["multi_old"][-2].strip() == f"{100 * (0.88 - 0.8) / 0.8:+.2f}"  # against the old baseline only
    assert lines["multi_old"][-3].strip() == "present_classes"
    # no human_parts baseline under the reference: no Delta_m rather than one against another definition
    assert lines["multi_ref"][-2].strip().startswith("n/a (no baseline with the same metric definition")
    runs["single_parts"] = row("single_parts", ["human_parts"], [0.25], "reference", "full")
    (tmp_path / "single_parts").mkdir()
    (tmp_path / "single_parts" / "metrics.json").write_text(json.dumps(runs["single_parts"]))
    rows = report.read_runs(tmp_path)
    text, points = report.table(rows, report.baselines(rows, "full"), "full")
    line = next(ln for ln in text.splitlines() if ln.startswith("| multi_ref |")).split("|")
    assert line[-2].strip() == f"{100 * ((0.55 - 0.5) / 0.5 + (0.3 - 0.25) / 0.25) / 2:+.2f}"
    assert points == [("polyhistor", 10, pytest.approx(100 * ((0.55 - 0.5) / 0.5 + (0.3 - 0.25) / 0.25) / 2))]


@pytest.mark.slow
def test_train_records_the_definitions_in_metrics_and_bundle(tmp_path, capsys):
    from vision import train
    from vision.synthetic import write_pascal_context_like

    data = write_pascal_context_like(tmp_path / "PASCAL_MT", train=4, val=2, size=32, seed=3)
    tiny = ["--data.root", str(data), "--data.tasks", "[semseg, saliency, normals]", "--model.backbone", "tiny-swin",
            "--model.backbone_kwargs", "{img_size: 32}", "--data.size", "32", "--data.batch_size", "4",
            "--model.decoder_width", "8", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
            "--model.methods", "[]", "--output_dir", str(tmp_path / "run")]
    train.main([*tiny, "--eval.definition", "{saliency: pooled}"])
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    want = {"semseg": "reference", "saliency": "pooled", "normals": "reference"}
    assert m["definition"] == want and m["config"]["eval"]["definition"] == {"saliency": "pooled"}
    assert set(m["test"]["normals"]) == {"mean_angle", "median_angle", "rmse_angle", "within_11.25", "within_22.5",
                                         "within_30"}
    assert json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())["vision"]["definition"] == want
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*tiny, "--eval.definition", "pooled", "--output_dir", str(tmp_path / "bad")])
    assert e.value.code == 2 and "eval.definition: 'pooled' is not a definition of semseg" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
