"""Fixtures for the medical tests: tiny datasets written in each dataset's REAL on-disk layout.

Every writer is deterministic and small (a handful of 32 x 32 images or 16 x 16 x 4 volumes):

- MedMNIST: one `.npz` with train/val/test _images / _labels (uint8 images, (N, 1) or (N, C) labels).
- NIH ChestX-ray14: `Data_Entry_2017.csv` with the official header (including the bracketed
  "OriginalImage[Width,Height]" columns and the trailing empty column), `train_val_list.txt`,
  `test_list.txt`, PNGs split over `images_001/images/` and `images_002/images/`.
- CheXpert: `CheXpert-v1.0-small/{train,valid}.csv` + `CheXpert-v1.0-small/{train,valid}/patientNNNNN/
  studyK/viewJ_frontal.jpg`, Paths starting with "CheXpert-v1.0-small/".
- Image folders: `{train,val,test}/<class>/` and the flat `<class>/` variant.
- Lung masks: `images/*.png` + `masks/*.png` (0/255).
- Medical Segmentation Decathlon: `dataset.json`, `imagesTr/*.nii.gz`, `labelsTr/*.nii.gz`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PNEUMONIAMNIST = SHARED_DATA / "pneumoniamnist_balanced" / "pneumoniamnist.npz"


def pattern(shape=(32, 32), seed=0, lo=0, hi=255, dtype=np.uint8) -> np.ndarray:
    """A deterministic image spanning [lo, hi] exactly."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(lo, hi, size=shape)
    a.flat[0], a.flat[-1] = lo, hi
    return np.round(a).astype(dtype)


def write_png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def write_dicom(path: Path, arr: np.ndarray, slope: float = 1.0, intercept: float = 0.0,
                photometric: str = "MONOCHROME2", pixels: bool = True) -> Path:
    """A minimal CT-like DICOM: implicit VR little endian, uint16 PixelData, Rescale tags set."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "P1"
    arr = np.asarray(arr, dtype=np.uint16)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixels:
        ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: Path, arr: np.ndarray) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))
    return path


# --------------------------------------------------------------------------- MedMNIST


def write_medmnist(path: Path, n=(6, 4, 4), shape=(28, 28), n_classes=2, label_cols=1, seed=0,
                   labels: dict | None = None) -> Path:
    """Official key layout; single-label labels cycle 0..n_classes-1 so every class is in every split."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, count in zip(("train", "val", "test"), n):
        data[f"{split}_images"] = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
        if labels and split in labels:
            data[f"{split}_labels"] = np.asarray(labels[split], dtype=np.uint8)
        elif label_cols == 1:
            data[f"{split}_labels"] = (np.arange(count) % n_classes).astype(np.uint8)[:, None]
        else:
            y = (rng.random((count, label_cols)) < 0.3).astype(np.uint8)
            y[np.arange(count), np.arange(count) % label_cols] = 1
            data[f"{split}_labels"] = y
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return path


# --------------------------------------------------------------------------- ChestX-ray14

CXR14_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""]
# patient -> findings of its images; patients 1-8 are train_val, 9-10 test
CXR14_FINDINGS = {
    1: ["No Finding", "Atelectasis"],
    2: ["Cardiomegaly|Effusion", "Effusion"],
    3: ["Infiltration", "Mass|Nodule"],
    4: ["Pneumonia", "No Finding"],
    5: ["Pneumothorax|Consolidation", "Edema"],
    6: ["Emphysema", "Fibrosis"],
    7: ["Pleural_Thickening", "Atelectasis|Effusion"],
    8: ["No Finding", "Cardiomegaly"],
    9: ["Effusion|Infiltration", "No Finding"],
    10: ["Mass", "Nodule"],
}


def cxr14_name(patient: int, follow_up: int) -> str:
    return f"{patient:08d}_{follow_up:03d}.png"


def write_cxr14(root: Path, findings: dict = CXR14_FINDINGS, test_patients=(9, 10), extra_rows=()) -> Path:
    rows, train_val, test = [], [], []
    for pid, fs in findings.items():
        for fu, f in enumerate(fs):
            name = cxr14_name(pid, fu)
            rows.append([name, f, fu, pid, 50, "M", "PA", 32, 32, 0.143, 0.143, ""])
            (test if pid in test_patients else train_val).append(name)
            sub = "images_001" if pid <= 5 else "images_002"
            write_png(root / sub / "images" / name, pattern(seed=pid * 10 + fu))
    rows += [list(r) for r in extra_rows]
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CXR14_HEADER)
        w.writerows(rows)
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


@pytest.fixture
def cxr14_root(tmp_path) -> Path:
    return write_cxr14(tmp_path / "cxr14")


# --------------------------------------------------------------------------- CheXpert

CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
# the hand-made row of patient00001: observation -> raw csv value
CHEXPERT_ROW = {"No Finding": "", "Enlarged Cardiomediastinum": "", "Cardiomegaly": "-1.0", "Lung Opacity": "1.0",
                "Lung Lesion": "", "Edema": "-1.0", "Consolidation": "0.0", "Pneumonia": "", "Atelectasis": "1.0",
                "Pneumothorax": "0.0", "Pleural Effusion": "-1.0", "Pleural Other": "", "Fracture": "",
                "Support Devices": "1.0"}


def chexpert_rows(split: str, patients, start: int = 1) -> list[dict]:
    rows = []
    for n, pid in enumerate(patients):
        for view, fl in ((1, "Frontal"), (2, "Lateral")):
            rel = f"CheXpert-v1.0-small/{split}/patient{pid:05d}/study1/view{view}_{fl.lower()}.jpg"
            r = {"Path": rel, "Sex": "Female", "Age": "60", "Frontal/Lateral": fl,
                 "AP/PA": "AP" if fl == "Frontal" else ""}
            obs = CHEXPERT_COLUMNS[5:]
            if pid == 1:
                r.update(CHEXPERT_ROW)
            else:  # every observation positive somewhere, a few uncertain
                for j, o in enumerate(obs):
                    r[o] = "1.0" if (j + pid) % 4 == 0 else "-1.0" if (j + pid) % 7 == 0 else "0.0" if j % 3 else ""
                if split == "valid":
                    r.update({o: ("1.0" if r[o] in ("1.0", "-1.0") else "0.0") for o in obs})
            rows.append(r)
    return rows


def write_chexpert(base: Path, train_patients=range(1, 13), valid_patients=(64541, 64542),
                   folder: str = "CheXpert-v1.0-small") -> Path:
    """Writes `base/<folder>/...`; returns the folder holding the CSVs (the module's root)."""
    from PIL import Image

    root = base / folder
    for split, patients in (("train", train_patients), ("valid", valid_patients)):
        rows = chexpert_rows(split, patients)
        for k, r in enumerate(rows):
            rel = Path(r["Path"])
            img = root / Path(*rel.parts[1:])
            img.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pattern(seed=k)).save(img, format="JPEG")
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CHEXPERT_COLUMNS)
            w.writeheader()
            w.writerows(rows)
    return root


@pytest.fixture
def chexpert_root(tmp_path) -> Path:
    return write_chexpert(tmp_path)


# --------------------------------------------------------------------------- image folders / lung masks


def write_imagefolder(root: Path, classes=("normal", "pneumonia"), per_class: int = 10, splits=None) -> Path:
    """Flat `root/<class>/` (splits None) or `root/<split>/<class>/` with {split: per_class}."""
    layout = {None: per_class} if splits is None else splits
    for split, n in layout.items():
        for c, cls in enumerate(classes):
            for i in range(n):
                base = root if split is None else root / split
                write_png(base / cls / f"{cls}_{split or 'all'}_{i:02d}.png", pattern(seed=100 * c + i))
    return root


def write_lungmask(root: Path, n: int = 8, mask_suffix: str = "") -> Path:
    for i in range(n):
        stem = f"CHNCXR_{i + 1:04d}_{i % 2}"
        write_png(root / "images" / f"{stem}.png", pattern(seed=i))
        m = np.zeros((32, 32), np.uint8)
        m[8:24, 4 + i % 3:14] = 255
        m[8:24, 18:28 - i % 3] = 255
        write_png(root / "masks" / f"{stem}{mask_suffix}.png", m)
    return root


# --------------------------------------------------------------------------- Decathlon

DECATHLON_LABELS = {"0": "background", "1": "spleen"}


def decathlon_volume(i: int, shape=(16, 16, 4), channels: int | None = None):
    rng = np.random.default_rng(i)
    img = rng.normal(0, 50, size=shape).astype(np.float32) - 500 + 100 * i
    lbl = np.zeros(shape, np.uint8)
    lbl[4:12, 4:12, 1:3] = 1
    if channels:
        img = np.stack([img + 1000 * c for c in range(channels)], axis=-1)
    return img, lbl


def write_decathlon(root: Path, n: int = 7, depths=None, channels: int | None = None, labels=DECATHLON_LABELS,
                    name: str = "Spleen") -> Path:
    entries = []
    for i in range(n):
        d = depths[i] if depths else 4
        img, lbl = decathlon_volume(i, (16, 16, d), channels)
        write_nifti(root / "imagesTr" / f"spleen_{i}.nii.gz", img)
        write_nifti(root / "labelsTr" / f"spleen_{i}.nii.gz", lbl)
        entries.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    meta = {"name": name, "description": "tiny", "tensorImageSize": "3D" if not channels else "4D",
            "modality": {"0": "CT"} if not channels else {str(c): f"MR{c}" for c in range(channels)},
            "labels": labels, "numTraining": n, "numTest": 0, "training": entries, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


@pytest.fixture
def med():
    """The writers and constants above, for test modules (a rootless tests/ folder cannot import conftest)."""
    import types

    names = ["SHARED_DATA", "PNEUMONIAMNIST", "pattern", "write_png", "write_dicom", "write_nifti", "write_medmnist",
             "CXR14_FINDINGS", "cxr14_name", "write_cxr14", "CHEXPERT_COLUMNS", "CHEXPERT_ROW", "chexpert_rows",
             "write_chexpert", "write_imagefolder", "write_lungmask", "DECATHLON_LABELS", "decathlon_volume",
             "write_decathlon"]
    return types.SimpleNamespace(**{n: globals()[n] for n in names})
