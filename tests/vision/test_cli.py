"""vision.train / vision.predict / vision.report end to end on a tiny fixture in the PASCAL-Context layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from shared import backbones, peft
from vision import predict, report, train
from vision.synthetic import write_pascal_context_like

TINY = ["--model.backbone", "tiny-swin", "--model.backbone_kwargs", "{img_size: 32}", "--data.size", "32",
        "--data.batch_size", "4", "--model.decoder_width", "8", "--trainer.max_epochs", "1",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def test_train_predict_report(tmp_path, capsys):
    data = write_pascal_context_like(tmp_path / "PASCAL_MT", train=4, val=2, size=32, seed=3)
    runs = tmp_path / "runs"
    base = ["--data.root", str(data), "--data.tasks", "[normals, saliency]", *TINY]
    for t in ("normals", "saliency"):
        train.main([*base, "--data.tasks", f"[{t}]", "--model.methods", "[{name: full}]",
                    "--output_dir", str(runs / f"single_{t}")])
    lite = "[{name: polyhistor_lite, bottleneck: 4, rank: 2, templates: 2, embed_dim: 4, proj_dim: 4}]"
    train.main([*base, "--model.methods", lite, "--output_dir", str(runs / "multi")])
    m = json.loads((runs / "multi" / "metrics.json").read_text())
    assert m["tasks"] == ["normals", "saliency"] and m["method"] == "polyhistor_lite"
    assert set(m["test"]["saliency"]) == {"maxf", "miou"} and 0 < m["test"]["normals"]["mean_angle"] < 180
    assert m["methods"][0]["tasks"] == 2  # filled in from the data
    assert m["definition"] == {"normals": "reference", "saliency": "reference"}  # the metric definitions used
    assert m["params"]["trainable"] == m["params"]["backbone"] + m["params"]["decoders"]

    # the bundle rebuilds the model; predict writes each task's map at the image's resolution
    model = train.load_bundle(runs / "multi" / "adapter")
    assert model.names == ["normals", "saliency"] and model.per_task
    img = data / "JPEGImages" / f"{(data / 'ImageSets/Context/val.txt').read_text().split()[0]}.jpg"
    out = tmp_path / "pred"
    capsys.readouterr()
    predict.main(["--adapter", str(runs / "multi" / "adapter"), "--out", str(out), str(img)])
    nrm = np.asarray(Image.open(out / f"{img.stem}_normals.png"))
    sal = np.asarray(Image.open(out / f"{img.stem}_saliency.png"))
    assert nrm.shape == (32, 32, 3) and sal.shape == (32, 32)
    maps = predict.predict(model, img)
    assert np.array_equal(maps["normals"], nrm) and np.array_equal(maps["saliency"], sal)
    with pytest.raises(SystemExit) as e:
        predict.main(["--adapter", str(runs / "multi" / "adapter"), "--out", str(out), str(img), str(tmp_path)])
    assert e.value.code == 2 and "is a folder, not an image" in capsys.readouterr().err

    report.main([str(runs)])
    text = (runs / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| multi |"))
    singles = {t: json.loads((runs / f"single_{t}" / "metrics.json").read_text())["test"][t] for t in ("normals", "saliency")}
    # normals: lower is better, so its relative change counts negatively
    want = 100 * (-(m["test"]["normals"]["mean_angle"] - singles["normals"]["mean_angle"]) / singles["normals"]["mean_angle"]
                  + (m["test"]["saliency"]["maxf"] - singles["saliency"]["maxf"]) / singles["saliency"]["maxf"]) / 2
    assert row.split("|")[-2].strip() == f"{want:+.2f}"
    assert (runs / "report.png").stat().st_size > 1000


def test_config_errors_name_the_key_and_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  rot: /x\n")
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(recipe)])
    assert e.value.code == 2 and f"{recipe}: unknown key 'data.rot'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--model.backbone", "tiny-swin"])
    assert "data.root is not set" in capsys.readouterr().err
    cfg, show = train.parse(["--data.size", "64", "--model.methods", "[{name: bitfit}]", "--print_config"])
    assert show and cfg["data"]["size"] == 64 and cfg["model"]["methods"] == [{"name": "bitfit"}]


def test_predict_refuses_a_bundle_of_another_domain(tmp_path, capsys):
    bb = backbones.create("tiny-swin")
    peft.attach(bb, [peft.BitFit()])
    peft.save(bb, tmp_path / "b")
    with pytest.raises(SystemExit) as e:
        predict.main(["--adapter", str(tmp_path / "b"), str(tmp_path / "x.jpg")])
    assert e.value.code == 2 and "not a vision bundle" in capsys.readouterr().err
