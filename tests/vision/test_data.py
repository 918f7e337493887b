"""Multi-task data in the PASCAL-Context, NYUD-v2 and plain-folder layouts (fixtures written in them)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat

from vision.data import DataError, MultiTaskDense, collate
from vision.synthetic import write_nyud_like, write_pascal_context_like
from vision.tasks import IGNORE, NORMALS_CONTEXT_CLASSES


@pytest.fixture(scope="module")
def pascal(tmp_path_factory):
    return write_pascal_context_like(tmp_path_factory.mktemp("pc") / "PASCAL_MT", train=6, val=3, size=32, seed=1)


def test_pascal_context_layout(pascal):
    ds = MultiTaskDense(pascal, split="train", size=32)
    assert list(ds.tasks) == ["semseg", "human_parts", "saliency", "normals"]
    assert len(ds) == 6 and ds.ids == (pascal / "ImageSets/Context/train.txt").read_text().split()
    has_parts = [(pascal / "human_parts" / f"{i}.mat").exists() for i in ds.ids]
    assert ds.missing == {"semseg": 0, "human_parts": has_parts.count(False), "saliency": 0, "normals": 0}
    for i, stem in enumerate(ds.ids):
        item = ds[i]
        sem = np.asarray(Image.open(pascal / "semseg/pascal-context" / f"{stem}.png"))
        assert torch.equal(item["labels"]["semseg"], torch.from_numpy(sem.astype(np.int64)))
        sal = np.asarray(Image.open(pascal / "sal_distill" / f"{stem}.png")) > 127
        assert torch.equal(item["labels"]["saliency"], torch.from_numpy(sal.astype(np.int64)))
        nrm = np.asarray(Image.open(pascal / "normals_distill" / f"{stem}.png")).astype(np.float32) * 2 / 255 - 1
        # normals count only on the full label map's NYUD-v2 classes (the benchmark's mask); elsewhere 0 = unlabelled
        context = loadmat(pascal / "pascal-context/trainval" / f"{stem}.mat")["LabelMap"]
        nrm = nrm * np.isin(context, list(NORMALS_CONTEXT_CLASSES))[..., None]
        assert torch.allclose(item["labels"]["normals"], torch.from_numpy(nrm).permute(2, 0, 1))
        assert ((item["labels"]["normals"].norm(dim=0) > 0) == (item["labels"]["semseg"] > 0)).all()  # ground masked
        parts = item["labels"]["human_parts"]
        if has_parts[i]:  # parts only inside the person (class 15) pixels; head = 1 ... lower legs = 6
            assert set(parts.unique().tolist()) <= set(range(7)) and (parts > 0).any()
            assert ((parts > 0) <= (item["labels"]["semseg"] == 15)).all()
        else:
            assert (parts == IGNORE).all()  # skipped for this task only
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["labels"]["normals"].shape == (2, 3, 32, 32)


def test_task_subset_resize_and_missing_error(pascal, tmp_path):
    ds = MultiTaskDense(pascal, split="val", tasks=["saliency", "semseg"], size=16)
    assert list(ds.tasks) == ["saliency", "semseg"] and ds[0]["labels"]["semseg"].shape == (16, 16)
    with pytest.raises(DataError, match="not in the pascal_context layout"):
        MultiTaskDense(pascal, tasks=["depth"])
    stems = [s for s in MultiTaskDense(pascal, split="train", size=32).ids
             if not (pascal / "human_parts" / f"{s}.mat").exists()]
    if stems:
        with pytest.raises(DataError, match=f"no human_parts label for '{stems[0]}'"):
            MultiTaskDense(pascal, split="train", missing="error")


def test_bad_label_maps_name_the_file(pascal, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(pascal, root)
    stem = (root / "ImageSets/Context/val.txt").read_text().split()[0]
    sem = root / "semseg/pascal-context" / f"{stem}.png"
    Image.fromarray(np.full((32, 32), 40, np.uint8)).save(sem)  # class 40 of 21
    ds = MultiTaskDense(root, split="val", tasks=["semseg"], size=32)
    with pytest.raises(DataError, match=rf"{stem}\.png: class id 40 outside the semseg task's 21 classes"):
        ds[0]
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(sem)  # wrong size
    with pytest.raises(DataError, match=rf"{stem}\.png: label map is 20x32, its image is 32x32"):
        ds[0]
    with pytest.raises(DataError, match="split list not found"):
        MultiTaskDense(root, split="test")


def test_nyud_layout(tmp_path):
    root = write_nyud_like(tmp_path / "NYUD_MT", train=3, val=2, size=32, seed=2)
    ds = MultiTaskDense(root, layout="nyud", split="val", size=32)
    assert list(ds.tasks) == ["semseg", "depth", "normals", "edges"] and ds.tasks["semseg"].channels == 40
    item = ds[0]
    raw = np.asarray(Image.open(root / "segmentation" / f"{ds.ids[0]}.png")).astype(np.int64)
    assert torch.equal(item["labels"]["semseg"], torch.from_numpy(np.where(raw == 0, IGNORE, raw - 1)))
    assert torch.equal(item["labels"]["depth"][0], torch.from_numpy(np.load(root / "depth" / f"{ds.ids[0]}.npy")))
    assert set(item["labels"]["edges"].unique().tolist()) <= {0, 1}


def test_folder_layout(tmp_path):
    rng = np.random.default_rng(0)
    for d in ("images", "semseg", "depth"):
        (tmp_path / d).mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / f"s{i}.png")
        Image.fromarray(rng.integers(0, 3, (8, 8), dtype=np.uint8)).save(tmp_path / "semseg" / f"s{i}.png")
        if i != 3:  # one depth map missing: skipped for depth, counted
            np.save(tmp_path / "depth" / f"s{i}.npy", rng.random((8, 8)).astype(np.float32) + 0.5)
    tr = MultiTaskDense(tmp_path, layout="folder", split="train", size=8, num_classes={"semseg": 3})
    va = MultiTaskDense(tmp_path, layout="folder", split="val", size=8, num_classes={"semseg": 3})
    assert list(tr.tasks) == ["depth", "semseg"] and tr.tasks["semseg"].channels == 3
    assert len(va) == 1 and sorted(tr.ids + va.ids) == [f"s{i}" for i in range(5)]
    assert tr.missing["depth"] + va.missing["depth"] == 1
    (tmp_path / "train.txt").write_text("s0\ns1\n")
    assert MultiTaskDense(tmp_path, layout="folder", split="train", size=8, num_classes={"semseg": 3}).ids == ["s0", "s1"]


def test_pascal_normals_mask_folder(pascal, tmp_path):
    import shutil

    root = tmp_path / "nomask"
    shutil.copytree(pascal, root)
    stem = (root / "ImageSets/Context/val.txt").read_text().split()[0]
    (root / "pascal-context/trainval" / f"{stem}.mat").unlink()
    ds = MultiTaskDense(root, split="val", size=32)  # missing: skip -> that image's normals are unlabelled
    assert ds.normals_mask and ds.missing["normals"] == 1 and (ds[0]["labels"]["normals"] == 0).all()
    with pytest.raises(DataError, match=rf"trainval/{stem}\.mat: not found \(the label map that selects"):
        MultiTaskDense(root, split="val", size=32, missing="error")
    shutil.rmtree(root / "pascal-context")
    with pytest.warns(UserWarning, match="normals are scored on every pixel"):
        ds = MultiTaskDense(root, split="val", size=32)
    assert ds.normals_mask is False and (ds[0]["labels"]["normals"].norm(dim=0) > 0).all()
