"""medical.data: every data module on fixtures written in its dataset's real on-disk layout."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medical.data import (
    CHEXPERT_LABELS, CXR14_LABELS, ChestXray14DataModule, CheXpertDataModule, DatasetLayoutError,
    DecathlonDataModule, ImageFolderDataModule, LungMaskDataModule, MedMNISTDataModule, masked_bce,
)
from medical.io import ImageReadError
from medical.transforms import IMAGENET_MEAN, IMAGENET_STD

S = 28  # model input size in these tests
LO = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)) - 1e-4
HI = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)) + 1e-4


def batch(dm, split="train"):
    dm.setup("fit")
    return next(iter({"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()))


def in_range(x: torch.Tensor) -> bool:
    return bool(x.min() >= LO and x.max() <= HI and torch.isfinite(x).all())


def names(split) -> set[str]:
    return {Path(p).name for p in split.items}


# --------------------------------------------------------------------------- MedMNIST


def test_medmnist_2d_single_label(tmp_path, med):
    path = med.write_medmnist(tmp_path / "pneumoniamnist.npz", n=(8, 4, 6))
    dm = MedMNISTDataModule(tmp_path, flag="pneumoniamnist", img_size=S, batch_size=5)
    assert dm.labels == ["normal", "pneumonia"] and dm.num_classes == 2 and not dm.multilabel
    assert {s: len(v) for s, v in dm.splits.items()} == {"train": 8, "val": 4, "test": 6}
    assert dm.name == "pneumoniamnist" and dm.npz_path == path
    x, y = batch(dm, "test")
    assert x.shape == (5, 3, S, S) and x.dtype == torch.float32 and in_range(x)
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 0, 1, 0]
    assert dm.preprocessing["size"] == S
    # the file itself as root, and an RGB variant
    med.write_medmnist(tmp_path / "rgb.npz", shape=(28, 28, 3), n_classes=9)
    dm = MedMNISTDataModule(tmp_path / "rgb.npz", flag="pathmnist", img_size=S, batch_size=4)
    assert dm.num_classes == 9 and batch(dm)[0].shape == (4, 3, S, S)


def test_medmnist_multilabel_and_3d(tmp_path, med):
    med.write_medmnist(tmp_path / "chestmnist.npz", label_cols=14)
    dm = MedMNISTDataModule(tmp_path / "chestmnist.npz", flag="chestmnist", img_size=S, batch_size=3)
    assert dm.multilabel and dm.num_classes == 14 and dm.labels[0] == "atelectasis"
    x, y = batch(dm, "val")
    assert y.shape == (3, 14) and y.dtype == torch.float32 and set(y.unique().tolist()) <= {0.0, 1.0}

    med.write_medmnist(tmp_path / "organmnist3d_64.npz", shape=(6, 20, 20), n_classes=11, n=(11, 3, 3))
    dm = MedMNISTDataModule(tmp_path, flag="organmnist3d", size=64, img_size=S, batch_size=2)
    assert dm.name == "organmnist3d_64" and dm.labels[0] == "liver" and dm.preprocessing["volume_axis"] == 0
    x, y = batch(dm, "test")
    assert x.shape == (2, 6, 3, S, S) and in_range(x) and y.shape == (2,)


def test_medmnist_unknown_flag_and_bad_files(tmp_path, med):
    med.write_medmnist(tmp_path / "mymnist.npz", n_classes=3)
    dm = MedMNISTDataModule(tmp_path / "mymnist.npz", flag="mymnist", img_size=S)
    assert dm.labels == ["class_0", "class_1", "class_2"]

    bad = med.write_medmnist(tmp_path / "bad" / "pneumoniamnist.npz", labels={"val": [[0], [1], [2], [0]]})
    with pytest.raises(DatasetLayoutError, match="class id 2 outside") as e:
        MedMNISTDataModule(bad, flag="pneumoniamnist")
    assert str(bad) in str(e.value) and "val_labels" in str(e.value)

    ml = med.write_medmnist(tmp_path / "ml" / "chestmnist.npz", label_cols=14, labels={"test": np.full((4, 14), 2)})
    with pytest.raises(DatasetLayoutError, match="test_labels has value 2"):
        MedMNISTDataModule(ml, flag="chestmnist")

    keys = tmp_path / "keys.npz"
    np.savez(keys, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(DatasetLayoutError, match="missing key") as e:
        MedMNISTDataModule(keys)
    assert "val_images" in str(e.value) and str(keys) in str(e.value)

    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(DatasetLayoutError, match=str(junk)):
        MedMNISTDataModule(junk)
    with pytest.raises(DatasetLayoutError, match="no MedMNIST file"):
        MedMNISTDataModule(tmp_path, flag="dermamnist")


def test_medmnist_few_shot_deterministic_and_empty_class(tmp_path, med):
    path = med.write_medmnist(tmp_path / "pneumoniamnist.npz", n=(20, 4, 4))
    a = MedMNISTDataModule(path, few_shot=3, seed=1)
    b = MedMNISTDataModule(path, few_shot=3, seed=1)
    assert a.splits["train"].items == b.splits["train"].items
    assert np.bincount(a.splits["train"].targets).tolist() == [3, 3]
    assert len(a.splits["val"]) == 4  # evaluation splits are never cut
    c = MedMNISTDataModule(path, few_shot=3, seed=2)
    assert c.splits["train"].items != a.splits["train"].items

    one = med.write_medmnist(tmp_path / "o" / "pneumoniamnist.npz", labels={"train": np.zeros((6, 1))})
    with pytest.raises(ValueError, match="'pneumonia'"):
        MedMNISTDataModule(one, few_shot=1)


@pytest.mark.real
def test_real_pneumoniamnist(med):
    if not med.PNEUMONIAMNIST.is_file():
        pytest.skip(f"{med.PNEUMONIAMNIST} not present")
    dm = MedMNISTDataModule(med.PNEUMONIAMNIST, flag="pneumoniamnist", img_size=32, batch_size=64, few_shot=10)
    assert dm.labels == ["normal", "pneumonia"]
    assert {s: len(v) for s, v in dm.splits.items()} == {"train": 20, "val": 270, "test": 468}
    x, y = batch(dm, "test")
    assert x.shape == (64, 3, 32, 32) and in_range(x) and set(y.tolist()) <= {0, 1}


# --------------------------------------------------------------------------- ChestX-ray14


def test_cxr14_splits_labels_and_patients(cxr14_root, med):
    dm = ChestXray14DataModule(cxr14_root, img_size=S, batch_size=4, val_fraction=0.25)
    assert dm.multilabel and dm.labels == CXR14_LABELS and dm.num_classes == 14
    test = {med.cxr14_name(p, f) for p in (9, 10) for f in (0, 1)}
    assert names(dm.splits["test"]) == test
    train_val = {med.cxr14_name(p, f) for p in range(1, 9) for f in (0, 1)}
    assert names(dm.splits["train"]) | names(dm.splits["val"]) == train_val
    groups = {s: set(dm.splits[s].groups) for s in ("train", "val", "test")}
    assert len(groups["val"]) == 2 and len(groups["train"]) == 6  # 25 % of 8 patients
    assert not groups["train"] & groups["val"] and not (groups["train"] | groups["val"]) & groups["test"]
    # images are found under both images_001/images and images_002/images
    folders = {p.parent.parent.name for p in dm.splits["train"].items + dm.splits["val"].items}
    assert folders == {"images_001", "images_002"}

    def target(name):
        for s in dm.splits.values():
            for p, y in zip(s.items, s.targets):
                if p.name == name:
                    return y.tolist()

    hot = lambda *fs: [1.0 if n in fs else 0.0 for n in CXR14_LABELS]  # noqa: E731
    assert target(med.cxr14_name(2, 0)) == hot("Cardiomegaly", "Effusion")
    assert target(med.cxr14_name(1, 0)) == hot()  # No Finding
    assert target(med.cxr14_name(9, 0)) == hot("Effusion", "Infiltration")
    x, y = batch(dm, "test")
    assert x.shape == (4, 3, S, S) and in_range(x) and y.shape == (4, 14) and y.dtype == torch.float32


def test_cxr14_few_shot_by_patient(tmp_path, med, cxr14_root):
    # 40 patients x 2 images; patient p has finding L[p % 14] then L[(p + 3) % 14]
    findings = {p: [CXR14_LABELS[p % 14], CXR14_LABELS[(p + 3) % 14]] for p in range(1, 41)}
    root = med.write_cxr14(tmp_path / "fs", findings=findings, test_patients=range(37, 41))
    a = ChestXray14DataModule(root, few_shot=1, seed=0)
    b = ChestXray14DataModule(root, few_shot=1, seed=0)
    assert a.splits["train"].items == b.splits["train"].items
    train = a.splits["train"]
    assert (train.targets.sum(0) >= 1).all()  # every finding has its shot
    assert len(set(train.groups)) == 14  # one patient per class, each patient used once
    full = ChestXray14DataModule(root, seed=0).splits["train"]
    assert set(train.groups) <= set(full.groups)  # drawn from train patients only, never val
    # Hernia never occurs in the default fixture: a shot of it is impossible, and the error says so
    with pytest.raises(ValueError, match="Hernia"):
        ChestXray14DataModule(cxr14_root, few_shot=1)


def test_cxr14_layout_errors(tmp_path, med):
    root = med.write_cxr14(tmp_path / "a", extra_rows=[["x_000.png", "Covid", 0, 99, 1, "F", "PA", 1, 1, 1, 1, ""]])
    with pytest.raises(DatasetLayoutError, match="'Covid'") as e:
        ChestXray14DataModule(root)
    assert "Data_Entry_2017.csv" in str(e.value) and "x_000.png" in str(e.value)

    root = med.write_cxr14(tmp_path / "b")
    rows = list(csv.reader(open(root / "Data_Entry_2017.csv")))
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        csv.writer(f).writerows([[c for j, c in enumerate(r) if j != 3] for r in rows])  # drop "Patient ID"
    with pytest.raises(DatasetLayoutError, match="Patient ID"):
        ChestXray14DataModule(root)

    root = med.write_cxr14(tmp_path / "c")
    (root / "images_002" / "images" / med.cxr14_name(10, 1)).unlink()
    with pytest.raises(DatasetLayoutError, match=med.cxr14_name(10, 1)) as e:
        ChestXray14DataModule(root)
    assert "test_list.txt" in str(e.value)

    root = med.write_cxr14(tmp_path / "d")
    (root / "test_list.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="test_list.txt"):
        ChestXray14DataModule(root)


# --------------------------------------------------------------------------- CheXpert


def row_of_patient1(dm) -> np.ndarray:
    for s in dm.splits.values():
        for p, y in zip(s.items, s.targets):
            if "patient00001" in str(p) and "frontal" in p.name:
                return y
    raise AssertionError("patient00001 not found")


@pytest.mark.parametrize("policy", ["ones", "zeros", "ignore"])
def test_chexpert_uncertainty_policies(chexpert_root, med, policy):
    dm = CheXpertDataModule(chexpert_root, uncertainty=policy, img_size=S)
    assert dm.multilabel and dm.labels == CHEXPERT_LABELS
    y = row_of_patient1(dm)
    for name, raw in med.CHEXPERT_ROW.items():
        v = y[CHEXPERT_LABELS.index(name)]
        if raw == "-1.0":
            expected = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}[policy]
            assert (math.isnan(v) and math.isnan(expected)) or v == expected, name
        else:
            assert v == (1.0 if raw == "1.0" else 0.0), name  # blank -> 0


def test_chexpert_splits_and_batches(chexpert_root):
    dm = CheXpertDataModule(chexpert_root, uncertainty="ignore", img_size=S, batch_size=24, test_fraction=0.25)
    assert set(dm.splits["val"].groups) == {"patient64541", "patient64542"} and len(dm.splits["val"]) == 4
    tr, te = set(dm.splits["train"].groups), set(dm.splits["test"].groups)
    assert len(te) == 3 and len(tr) == 9 and not tr & te  # held-out train PATIENTS
    x, y = batch(dm, "train")
    assert x.shape == (18, 3, S, S) and in_range(x) and y.shape == (18, 14) and torch.isnan(y).any()
    # the Path prefix "CheXpert-v1.0-small/" resolves against root.parent
    assert all(p.is_file() and p.is_relative_to(chexpert_root) for p in dm.splits["train"].items)
    frontal = CheXpertDataModule(chexpert_root, frontal_only=True, test_fraction=0.25)
    assert all("frontal" in p.name for s in frontal.splits.values() for p in s.items)


def test_chexpert_renamed_folder_and_errors(tmp_path, med):
    root = med.write_chexpert(tmp_path / "r", folder="chexpert")  # Paths still say CheXpert-v1.0-small/
    dm = CheXpertDataModule(root)
    assert all(p.is_file() for p in dm.splits["train"].items)

    root = med.write_chexpert(tmp_path / "m")
    next(root.glob("train/patient00003/study1/*.jpg")).unlink()
    with pytest.raises(DatasetLayoutError, match="not found") as e:
        CheXpertDataModule(root)
    assert "train.csv" in str(e.value)

    root = med.write_chexpert(tmp_path / "v")
    text = (root / "train.csv").read_text().splitlines()
    text[3] = text[3].replace(",1.0,", ",2.0,", 1)
    (root / "train.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DatasetLayoutError, match="'2.0'") as e:
        CheXpertDataModule(root)
    assert "line 4" in str(e.value)

    root = med.write_chexpert(tmp_path / "c")
    rows = list(csv.DictReader(open(root / "valid.csv")))
    with open(root / "valid.csv", "w", newline="") as f:
        cols = [c for c in med.CHEXPERT_COLUMNS if c != "Edema"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DatasetLayoutError, match="Edema") as e:
        CheXpertDataModule(root)
    assert "valid.csv" in str(e.value)
    with pytest.raises(ValueError, match="uncertainty"):
        CheXpertDataModule(root, uncertainty="maybe")


def test_chexpert_few_shot_groups(tmp_path, med):
    root = med.write_chexpert(tmp_path, train_patients=range(1, 41))
    a = CheXpertDataModule(root, few_shot=1, seed=0)
    b = CheXpertDataModule(root, few_shot=1, seed=0)
    assert a.splits["train"].items == b.splits["train"].items
    train = a.splits["train"]
    assert len(set(train.groups)) == 14 and (np.nan_to_num(train.targets) == 1).sum(0).min() >= 1
    assert not set(train.groups) & set(a.splits["test"].groups)
    with pytest.raises(ValueError, match="fewer than k=50"):
        CheXpertDataModule(root, few_shot=50)


def test_masked_bce_ignores_nan():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]], requires_grad=True)
    y = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, float("nan")]])
    loss = masked_bce(logits, y)
    keep = ~torch.isnan(y)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], y[keep])
    assert torch.allclose(loss, ref)
    loss.backward()
    assert (logits.grad[~keep] == 0).all() and (logits.grad[keep] != 0).all()
    none = masked_bce(logits, torch.full_like(y, float("nan")))
    assert none.item() == 0.0 and none.requires_grad


# --------------------------------------------------------------------------- image folders


def test_imagefolder_split_layout_and_formats(tmp_path, med):
    root = med.write_imagefolder(tmp_path / "f", splits={"train": 4, "val": 2, "test": 3})
    med.write_dicom(root / "train" / "normal" / "ct.dcm", med.pattern(dtype=np.uint16), slope=2, intercept=-100)
    med.write_nifti(root / "train" / "normal" / "slice.nii.gz", med.pattern().astype(np.float32))
    np.save(root / "train" / "pneumonia" / "arr.npy", med.pattern().astype(np.float32))
    (root / "train" / "normal" / "notes.txt").write_text("ignored")
    dm = ImageFolderDataModule(root, img_size=S, batch_size=32)
    assert dm.labels == ["normal", "pneumonia"] and not dm.multilabel
    assert {s: len(v) for s, v in dm.splits.items()} == {"train": 11, "val": 4, "test": 6}
    assert names(dm.splits["val"]) == {f"{c}_val_{i:02d}.png" for c in ("normal", "pneumonia") for i in range(2)}
    x, y = batch(dm, "train")
    assert x.shape == (11, 3, S, S) and in_range(x) and y.dtype == torch.int64
    assert sorted(y.tolist()) == [0] * 6 + [1] * 5


def test_imagefolder_flat_stratified_split(tmp_path, med):
    root = med.write_imagefolder(tmp_path / "flat", per_class=20)
    dm = ImageFolderDataModule(root, seed=3)
    for s, n in (("train", 14), ("val", 3), ("test", 3)):
        assert np.bincount(dm.splits[s].targets).tolist() == [n, n], s
    every = [p for s in dm.splits.values() for p in s.items]
    assert len(every) == len(set(every)) == 40
    again = ImageFolderDataModule(root, seed=3)
    assert all(again.splits[s].items == dm.splits[s].items for s in dm.splits)
    other = ImageFolderDataModule(root, seed=4)
    assert other.splits["test"].items != dm.splits["test"].items


def test_imagefolder_errors(tmp_path, med):
    root = med.write_imagefolder(tmp_path / "a", splits={"train": 3, "val": 1, "test": 1})
    med.write_png(root / "val" / "covid" / "x.png", med.pattern())
    with pytest.raises(DatasetLayoutError, match="covid"):
        ImageFolderDataModule(root)

    root = med.write_imagefolder(tmp_path / "b", splits={"train": 3, "val": 1, "test": 1})
    bad = root / "test" / "normal" / "normal_test_00.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    dm = ImageFolderDataModule(root, img_size=S)
    with pytest.raises(ImageReadError, match=str(bad)):
        dm.dataset("test")[0]

    root = med.write_imagefolder(tmp_path / "c", splits={"train": 3, "val": 1, "test": 1})
    (root / "train" / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="no images"):
        ImageFolderDataModule(root)


# --------------------------------------------------------------------------- lung masks


def test_lungmask_batches_and_split(tmp_path, med):
    root = med.write_lungmask(tmp_path / "lungs", n=10)
    dm = LungMaskDataModule(root, img_size=S, batch_size=4)
    assert dm.labels == ["background", "lung"] and dm.num_classes == 2
    assert {s: len(v) for s, v in dm.splits.items()} == {"train": 7, "val": 1, "test": 2}
    stems = [Path(p).stem for s in dm.splits.values() for p, _ in s.items]
    assert len(stems) == len(set(stems)) == 10
    x, m = batch(dm, "train")
    assert x.shape == (4, 3, S, S) and in_range(x)
    assert m.shape == (4, S, S) and m.dtype == torch.int64 and set(m.unique().tolist()) == {0, 1}
    ds = LungMaskDataModule(root, img_size=32).dataset("train")
    _, mask = ds[0]
    raw = (np.asarray(Image.open(ds.split.items[0][1][0])) > 127).astype(int)
    assert torch.equal(mask, torch.from_numpy(raw))  # 0/255 -> {0, 1}, same size -> untouched


def test_lungmask_suffix_and_montgomery_layouts(tmp_path, med):
    root = med.write_lungmask(tmp_path / "shenzhen", n=8, mask_suffix="_mask")
    assert len(LungMaskDataModule(root).splits["train"]) > 0

    mont = tmp_path / "montgomery"
    for i in range(8):
        stem = f"MCUCXR_{i:04d}_0"
        med.write_png(mont / "CXR_png" / f"{stem}.png", med.pattern(seed=i))
        left, right = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
        left[4:20, 2:10], right[4:20, 20:30] = 255, 255
        med.write_png(mont / "ManualMask" / "leftMask" / f"{stem}.png", left)
        med.write_png(mont / "ManualMask" / "rightMask" / f"{stem}.png", right)
    dm = LungMaskDataModule(mont, img_size=32)
    _, mask = dm.dataset("train")[0]
    assert mask.sum() == 16 * 8 + 16 * 10  # both lungs


def test_lungmask_errors(tmp_path, med):
    root = med.write_lungmask(tmp_path / "a", n=8)
    victim = sorted((root / "masks").iterdir())[2]
    victim.unlink()
    with pytest.raises(DatasetLayoutError, match=victim.stem) as e:
        LungMaskDataModule(root)
    assert "images" in str(e.value)
    assert sum(len(v) for v in LungMaskDataModule(root, missing_masks="skip").splits.values()) == 7

    root = med.write_lungmask(tmp_path / "b", n=8)
    dm = LungMaskDataModule(root, img_size=S)
    img_path, (mask_path,) = dm.splits["train"].items[0]
    med.write_png(mask_path, np.zeros((30, 32), np.uint8))
    with pytest.raises(ImageReadError) as e:
        dm.dataset("train")[0]
    assert str(img_path) in str(e.value) and str(mask_path) in str(e.value)


# --------------------------------------------------------------------------- Decathlon


def test_decathlon_volume_splits_and_slices(tmp_path, med):
    root = med.write_decathlon(tmp_path / "Task09_Spleen", depths=[3, 4, 5, 3, 4, 5, 6])
    dm = DecathlonDataModule(root, img_size=S, batch_size=5)
    assert dm.labels == ["background", "spleen"] and dm.num_classes == 2 and dm.name == "decathlon-Spleen"
    vols = {s: dm.volumes(s) for s in ("train", "val", "test")}
    assert [len(v) for v in vols.values()] == [5, 1, 1]
    flat = [p for v in vols.values() for p in v]
    assert len(set(flat)) == 7  # no volume in two splits
    depth = {root / "imagesTr" / f"spleen_{i}.nii.gz": d for i, d in enumerate([3, 4, 5, 3, 4, 5, 6])}
    for s, v in vols.items():
        assert len(dm.splits[s]) == sum(depth[i] for i, _ in v), s
    x, m = batch(dm, "train")
    assert x.shape == (5, 3, S, S) and in_range(x) and m.shape == (5, S, S) and m.dtype == torch.int64
    assert set(m.unique().tolist()) <= {0, 1}
    # every training slice is served exactly once per epoch
    seen = [i for i in dm.train_sampler(None)]
    assert sorted(seen) == list(range(len(dm.splits["train"])))
    img, lbl = vols["val"][0]
    xv, mv = dm.load_volume(img, lbl)
    d = len(dm.splits["val"])
    assert xv.shape == (d, 3, S, S) and mv.shape == (d, S, S)
    # a slice from the training pipeline equals the same slice of load_volume
    x0, m0 = dm.dataset("val")[1]
    assert torch.allclose(x0, xv[1], atol=1e-5) and torch.equal(m0, mv[1])
    assert dm.preprocessing["slice_axis"] == -1 and dm.preprocessing["intensity"] == "percentile"


def test_decathlon_multimodal_and_few_shot(tmp_path, med):
    root = med.write_decathlon(tmp_path / "Task01", channels=2)
    a = DecathlonDataModule(root, img_size=16, modality=0, intensity=[-1000, 2000])
    b = DecathlonDataModule(root, img_size=16, modality=1, intensity=[-1000, 2000])
    xa, _ = a.dataset("val")[0]
    xb, _ = b.dataset("val")[0]
    assert (xb - xa).mean() > 0.5  # channel 1 is 1000 brighter
    with pytest.raises(DatasetLayoutError, match="modality 2"):
        DecathlonDataModule(root, modality=2)
    fs = DecathlonDataModule(root, few_shot=2, seed=0)
    assert len(fs.volumes("train")) == 2 and len(fs.splits["train"]) == 8
    assert fs.volumes("train") == DecathlonDataModule(root, few_shot=2, seed=0).volumes("train")
    assert len(fs.volumes("val")) == 1


def test_decathlon_errors(tmp_path, med):
    import nibabel as nib

    root = med.write_decathlon(tmp_path / "a")
    lbl = root / "labelsTr" / "spleen_0.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 4), 3, np.uint8), np.eye(4)), str(lbl))
    dm = DecathlonDataModule(root, img_size=16, seed=0)
    split = next(s for s in ("train", "val", "test") if (root / "imagesTr" / "spleen_0.nii.gz") in
                 [Path(i) for i, _ in dm.volumes(s)])
    idx = next(j for j, (v, _) in enumerate(dm.splits[split].items) if v == 0)
    with pytest.raises(DatasetLayoutError, match="label value 3 outside") as e:
        dm.dataset(split)[idx]
    assert str(lbl) in str(e.value)

    root = med.write_decathlon(tmp_path / "b")
    med.write_nifti(root / "labelsTr" / "spleen_1.nii.gz", np.zeros((16, 15, 4), np.uint8))
    with pytest.raises(ImageReadError) as e:
        DecathlonDataModule(root)
    assert "imagesTr/spleen_1.nii.gz" in str(e.value) and "labelsTr/spleen_1.nii.gz" in str(e.value)

    root = med.write_decathlon(tmp_path / "c")
    (root / "imagesTr" / "spleen_2.nii.gz").write_bytes(b"\x1f\x8b" + b"corrupt" * 20)
    with pytest.raises(ImageReadError, match="spleen_2.nii.gz"):
        DecathlonDataModule(root)

    root = med.write_decathlon(tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    del meta["labels"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetLayoutError, match="'labels'") as e:
        DecathlonDataModule(root)
    assert "dataset.json" in str(e.value)

    root = med.write_decathlon(tmp_path / "e")
    (root / "labelsTr" / "spleen_3.nii.gz").unlink()
    with pytest.raises(DatasetLayoutError, match=r"training\[3\]"):
        DecathlonDataModule(root)


def test_datasets_pickle_without_the_trainer(tmp_path, med):
    """Loader workers under spawn / forkserver pickle the dataset (and so the data module)."""
    import pickle

    root = med.write_decathlon(tmp_path / "Task", n=7)
    dm = DecathlonDataModule(root, img_size=16)
    dm.trainer = lambda: None  # stands for an attached, unpicklable trainer
    ds = dm.dataset("val")
    x, m = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    x2, m2 = clone[0]
    assert torch.equal(x, x2) and torch.equal(m, m2)
    assert clone.load.__self__.trainer is None and dm.trainer is not None


# --------------------------------------------------------------------------- issue 13: protocols and labels


def test_medmnist_flag_and_size_come_from_the_file_name(tmp_path, med):
    path = med.write_medmnist(tmp_path / "breastmnist_64.npz", shape=(64, 64), n=(4, 2, 2))
    dm = MedMNISTDataModule(path, img_size=S)  # no flag: breastmnist, size 64 from the name
    assert (dm.flag, dm.size, dm.name) == ("breastmnist", 64, "breastmnist_64")
    assert dm.labels == ["malignant", "normal, benign"]  # 0 malignant, 1 normal/benign
    assert MedMNISTDataModule(path, flag="BreastMNIST", size=64).labels == dm.labels
    with pytest.raises(DatasetLayoutError, match=r"breastmnist_64\.npz: the file name says flag 'breastmnist' "
                                                 r"but flag is 'pneumoniamnist'"):
        MedMNISTDataModule(path, flag="pneumoniamnist")
    with pytest.raises(DatasetLayoutError, match="file name says size 64 but size is 28"):
        MedMNISTDataModule(path, size=28)
    with pytest.raises(DatasetLayoutError, match="a folder root needs flag"):
        MedMNISTDataModule(tmp_path)
    plain = med.write_medmnist(tmp_path / "breastmnist.npz")
    assert (MedMNISTDataModule(plain).flag, MedMNISTDataModule(plain).size) == ("breastmnist", 28)


def test_medmnist_recipe_takes_the_flag_from_the_file(tmp_path, med):
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "domains/medical/data/medmnist.yaml").read_text())
    path = med.write_medmnist(tmp_path / "breastmnist.npz")
    dm = MedMNISTDataModule(**{**recipe["data"]["init_args"], "root": str(path), "num_workers": 0})
    assert dm.flag == "breastmnist" and dm.labels[0] == "malignant"


def chexpert_raw(root: Path, csv_name: str = "train.csv") -> dict[str, dict[str, str]]:
    """The CSV's raw values by image file: {path tail: {observation: raw}}."""
    rows = csv.DictReader(open(root / csv_name))
    return {"/".join(Path(r["Path"]).parts[-3:]): r for r in rows}


def test_chexpert_uncertain_labels_are_never_scored(tmp_path, med):
    root = med.write_chexpert(tmp_path, train_patients=range(1, 21))
    dm = CheXpertDataModule(root, uncertainty="ones", test_fraction=0.3)
    raw = chexpert_raw(root)
    seen = {"train": 0, "test": 0}
    for split in ("train", "test"):
        s = dm.splits[split]
        for p, y in zip(s.items, s.targets):
            r = raw["/".join(Path(p).parts[-3:])]
            for j, obs in enumerate(CHEXPERT_LABELS):
                if r[obs] == "-1.0":
                    seen[split] += 1
                    # training follows the policy (U-Ones); evaluation leaves uncertain labels out
                    assert (y[j] == 1.0) if split == "train" else np.isnan(y[j]), (split, p, obs)
                else:
                    assert y[j] == (1.0 if r[obs] == "1.0" else 0.0)
    assert seen["train"] and seen["test"]  # the fixture has uncertain labels in both


def test_chexpert_competition_labels(chexpert_root):
    from medical.data import CHEXPERT_COMPETITION

    dm = CheXpertDataModule(chexpert_root, labels="competition", img_size=S, batch_size=4)
    assert dm.labels == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert dm.labels == CHEXPERT_COMPETITION and dm.num_classes == 5
    raw = chexpert_raw(chexpert_root, "valid.csv")
    for p, y in zip(dm.splits["val"].items, dm.splits["val"].targets):
        r = raw["/".join(Path(p).parts[-3:])]
        assert y.tolist() == [float(r[o]) if r[o] else 0.0 for o in dm.labels]
    _, y = batch(dm, "val")
    assert y.shape == (4, 5)
    with pytest.raises(ValueError, match="labels must be one of"):
        CheXpertDataModule(chexpert_root, labels="five")


def test_chexpert_labels_without_positives_are_left_out_and_reported(chexpert_root, caplog):
    from shared.module import PerClassScore

    with caplog.at_level("WARNING", logger="medical.data"):
        dm = CheXpertDataModule(chexpert_root, uncertainty="ignore")
    val = dm.splits["val"].targets  # 2 patients x 2 views: some observations never positive
    undefined = [o for j, o in enumerate(dm.labels) if not ((val[:, j] == 1).any() and (val[:, j] == 0).any())]
    assert undefined and f"CheXpert val split: {len(undefined)} observation(s)" in caplog.text
    assert str(undefined) in caplog.text
    # a perfect score on the defined labels is 1.0; the undefined ones are dropped, not scored 0
    target = torch.from_numpy(np.nan_to_num(val, nan=-1.0)).long()
    metric = PerClassScore("auroc")
    metric.update(target.clamp_min(0).float(), target)
    per_class = metric.compute()
    assert int(torch.isnan(per_class).sum()) == len(undefined)
    assert per_class[~torch.isnan(per_class)].mean().item() == 1.0


def kermany(root: Path, med, patients: dict[str, int]) -> Path:
    """Kermany chest X-ray names: pneumonia `person<N>_<bacteria|virus>_<k>.jpeg`, normal
    `IM-<NNNN>-<kkkk>.jpeg`; several images per patient."""
    k = 0
    for cls, n in patients.items():
        for pid in range(1, n + 1):
            for take in range(3):
                name = (f"person{pid}_{'bacteria' if take % 2 else 'virus'}_{take}.jpeg" if cls == "PNEUMONIA"
                        else f"IM-{pid:04d}-{take + 1:04d}.jpeg")
                (root / "train" / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(med.pattern(seed=k)).save(root / "train" / cls / name, format="JPEG")
                k += 1
    return root


def test_imagefolder_splits_by_patient_with_a_group_pattern(tmp_path, med, caplog):
    root = kermany(tmp_path / "chest_xray", med, {"NORMAL": 10, "PNEUMONIA": 10})
    with caplog.at_level("WARNING", logger="medical.data"):
        by_image = ImageFolderDataModule(root)
    assert "30 of 60 file names look grouped by patient (e.g. person10_bacteria_1.jpeg)" in caplog.text
    pid = lambda p: p.name.split("_")[0] if p.name.startswith("person") else p.name.split("-")[1]  # noqa: E731
    leaks = {pid(p) for p in by_image.splits["train"].items} & {pid(p) for p in by_image.splits["val"].items}
    assert leaks  # by image, patients straddle train and val
    dm = ImageFolderDataModule(root, group_pattern=r"^(person\d+)_|IM-(\d+)-")
    got = {s: {pid(p) for p in dm.splits[s].items} for s in ("train", "val", "test")}
    assert not got["train"] & got["val"] and not got["train"] & got["test"] and not got["val"] & got["test"]
    assert sum(len(dm.splits[s]) for s in got) == 60 and len(got["val"]) == len(got["test"]) == 3  # of 20
    assert all(len(dm.splits[s]) == 3 * len(got[s]) for s in got)  # whole patients (3 images each)
    assert dm.protocol == "split folders; val, test carved from train by patient"
    few = ImageFolderDataModule(root, group_pattern=r"^(person\d+)_|IM-(\d+)-", few_shot=2)
    assert len(set(few.splits["train"].groups)) == 4 and len(few.splits["train"]) == 12  # 2 patients per class
    with pytest.raises(ValueError, match="not a valid regex"):
        ImageFolderDataModule(root, group_pattern="(person")


def test_imagefolder_balanced_sampler_and_multilabel_pos_weight(tmp_path, med, chexpert_root):
    root = med.write_imagefolder(tmp_path / "f", per_class=10)
    for p in sorted((root / "pneumonia").iterdir())[:8]:
        p.unlink()  # 10 normal, 2 pneumonia
    dm = ImageFolderDataModule(root, balanced_sampler=True, img_size=S, seed=0)
    ys = dm.splits["train"].targets
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    drawn = np.concatenate([ys[list(sampler)] for _ in range(200)])
    assert abs((drawn == 1).mean() - 0.5) < 0.05 and (ys == 1).mean() < 0.25
    assert dm.pos_weight is None  # single-label
    cx = CheXpertDataModule(chexpert_root, uncertainty="ignore")
    t = cx.splits["train"].targets
    want = [float(((t[:, j] == 0).sum()) / (t[:, j] == 1).sum()) if (t[:, j] == 1).any() else 1.0
            for j in range(t.shape[1])]
    assert cx.pos_weight == pytest.approx(want) and max(want) > 1
    with pytest.raises(ValueError, match="balanced_sampler is for single-label"):
        CheXpertDataModule(chexpert_root, balanced_sampler=True).train_dataloader()
