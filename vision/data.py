"""Multi-task dense datasets in their public on-disk layouts, and the Lightning data module.

- PASCAL-Context multi-task (`layout: pascal_context`), as the public multi-task repositories
  (ASTMTL, MTI-Net, ATRC) arrange it: `JPEGImages/<id>.jpg`, `semseg/pascal-context/<id>.png`
  (21 classes, 255 ignored), `human_parts/<id>.mat` (PASCAL-Part `anno` struct: objects with
  `class`, `mask`, `parts` with `part_name` / `mask`; grouped into 6 parts + background),
  `sal_distill/<id>.png` (foreground > 127), `normals_distill/<id>.png` (RGB = (n + 1) / 2 * 255),
  `ImageSets/Context/{train,val}.txt`. Normals count only where the full PASCAL-Context label
  (`pascal-context/trainval/<id>.mat`, `LabelMap`) is a class NYUD-v2 also has, as the benchmark
  scores them (`tasks.NORMALS_CONTEXT_CLASSES`; elsewhere the label vector is 0: unlabelled);
  without a `pascal-context/trainval/` folder every pixel counts (`normals_mask` False, warned).
- NYUD-v2 multi-task (`layout: nyud`): `images/<id>.(jpg|png)`, `segmentation/<id>.png` (1..40,
  0 = unlabelled -> ignored), `depth/<id>.npy` (metres, 0 = invalid), `normals/<id>.npy` (H, W, 3),
  `edge/<id>.npy` (0 / 1), `gt_sets/{train,val}.txt`.
- Plain folders (`layout: folder`): `images/<stem>.*` and one subfolder per task with the same
  stems (class maps / binary maps as PNG, normals as PNG or .npy, depth as .npy or 16-bit PNG in
  mm); `train.txt` / `val.txt` list stems, else a seeded 80 / 20 split.

A label map missing for one task is skipped for that task (its label is all "ignore" and the
dataset counts it in `missing[task]`) with `missing: skip`, or raises naming the file with
`missing: error`. Label maps whose size differs from the image, class ids outside the task's
classes and unreadable files raise one error naming the file.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
import lightning as L

from .tasks import HUMAN_PARTS, IGNORE, NORMALS_CONTEXT_CLASSES, PERSON, Task, make_task

MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)  # ImageNet, as the Swin checkpoints expect
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
LAYOUT_TASKS = {
    "pascal_context": ("semseg", "human_parts", "saliency", "normals"),
    "nyud": ("semseg", "depth", "normals", "edges"),
}


class DataError(ValueError):
    """A dataset file or field is missing or malformed (the message names it)."""


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) in 0..255: uint8, or float32 for 16-bit / 32-bit pictures, scaled by their bit
    depth (`vision.images.rgb_array`; PIL's convert("RGB") would clip them to white)."""
    from .images import rgb_array

    try:
        with Image.open(path) as im:
            return rgb_array(im)
    except Exception as e:  # noqa: BLE001 - report any decoder failure with the file name
        raise DataError(f"{path}: cannot read image ({e})") from None


def read_map(path: Path) -> np.ndarray:
    """A label map: PNG (kept as stored), .npy or .mat (the PASCAL-Part struct is read elsewhere)."""
    try:
        if path.suffix == ".npy":
            return np.load(path)
        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read label map ({e})") from None


def read_human_parts(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """PASCAL-Part annotation -> (H, W) uint8 part map (0 background); persons' parts only."""
    from scipy.io import loadmat

    try:
        anno = loadmat(path, squeeze_me=True, struct_as_record=False)["anno"]
        objects = np.atleast_1d(anno.objects)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a PASCAL-Part annotation with anno.objects ({e})") from None
    out = np.zeros(shape, np.uint8)
    for obj in objects:
        if str(getattr(obj, "class", "")) != PERSON:
            continue
        parts = getattr(obj, "parts", [])
        for part in np.atleast_1d(parts) if not isinstance(parts, (list, str)) else parts:
            if not hasattr(part, "part_name"):
                continue
            name = str(part.part_name)
            if name not in HUMAN_PARTS:
                raise DataError(f"{path}: unknown human part name {name!r}")
            mask = np.asarray(part.mask)
            if mask.shape != shape:
                raise DataError(f"{path}: part {name!r} mask is {mask.shape}, the image is {shape}")
            out[mask > 0] = HUMAN_PARTS[name]
    return out


def read_context_labels(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The full (459-class) PASCAL-Context label map `LabelMap` of `path` (.mat), (H, W)."""
    from scipy.io import loadmat

    try:
        labels = np.asarray(loadmat(path)["LabelMap"])
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a PASCAL-Context label map with a LabelMap field ({e})") from None
    if labels.shape != tuple(shape):
        raise DataError(f"{path}: LabelMap is {labels.shape[0]}x{labels.shape[1]}, its image is {shape[0]}x{shape[1]}")
    return labels


def _ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: split list not found")
    return [s.strip() for s in path.read_text().splitlines() if s.strip()]


def _find(folder: Path, stem: str, exts) -> Path | None:
    for e in exts:
        p = folder / f"{stem}{e}"
        if p.is_file():
            return p
    return None


class MultiTaskDense(torch.utils.data.Dataset):
    """One split of a multi-task dense dataset: image + one label per task, resized to `size`."""

    def __init__(self, root, layout: str = "pascal_context", split: str = "train", tasks=None,
                 size: int = 224, missing: str = "skip", num_classes: dict[str, int] | None = None,
                 seed: int = 0, val_fraction: float = 0.2, cache: bool = False):
        self._cache: dict[int, dict] | None = {} if cache else None  # decoded items kept in memory (small sets)
        self.root, self.layout, self.split, self.size = Path(root), layout, split, int(size)
        if layout not in ("pascal_context", "nyud", "folder"):
            raise DataError(f"layout must be pascal_context, nyud or folder, got {layout!r}")
        if missing not in ("skip", "error"):
            raise DataError(f"missing must be 'skip' or 'error', got {missing!r}")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data root not found")
        self.missing_policy = missing
        if tasks is None:
            tasks = LAYOUT_TASKS.get(layout) or sorted(p.name for p in self.root.iterdir()
                                                       if p.is_dir() and p.name in ("semseg", "human_parts", "saliency", "normals", "depth", "edges"))
        nc = {"nyud": {"semseg": 40}}.get(layout, {}) | dict(num_classes or {})
        self.tasks: dict[str, Task] = {t: make_task(t, nc.get(t)) for t in tasks}
        allowed = LAYOUT_TASKS.get(layout)
        if allowed and set(self.tasks) - set(allowed):
            raise DataError(f"tasks {sorted(set(self.tasks) - set(allowed))} are not in the {layout} layout "
                            f"(it has {list(allowed)})")
        self.ids = self._split_ids(split, seed, val_fraction)
        if not self.ids:
            raise DataError(f"{self.root}: split {split!r} is empty")
        self.missing = {t: 0 for t in self.tasks}
        self.present = [{t: self.label_path(i, t) is not None for t in self.tasks} for i in self.ids]
        # PASCAL-Context normals: scored only on the NYUD-v2 classes of the full label map (None: not applicable)
        self.normals_mask = None
        if layout == "pascal_context" and "normals" in self.tasks:
            self.normals_mask = self.context_dir.is_dir()
            if not self.normals_mask:
                warnings.warn(f"{self.context_dir}: not found, so normals are scored on every pixel, not only on "
                              "the NYUD-v2 classes as the multi-task benchmark does", stacklevel=2)
            for stem, has in zip(self.ids, self.present):
                if self.normals_mask and has["normals"] and not (self.context_dir / f"{stem}.mat").is_file():
                    if missing == "error":
                        raise DataError(f"{self.context_dir / f'{stem}.mat'}: not found (the label map that selects "
                                        "the pixels the normals of this image are scored on)")
                    has["normals"] = False  # counted as a missing normals label below
        for stem, has in zip(self.ids, self.present):
            for t, ok in has.items():
                if not ok:
                    if missing == "error":
                        raise DataError(f"{self.root}: no {t} label for {stem!r} (expected under {self.task_dir(t)})")
                    self.missing[t] += 1

    # --- layout --------------------------------------------------------------------------
    def _split_ids(self, split, seed, val_fraction):
        if self.layout == "pascal_context":
            return _ids(self.root / "ImageSets" / "Context" / f"{split}.txt")
        if self.layout == "nyud":
            return _ids(self.root / "gt_sets" / f"{split}.txt")
        if (self.root / f"{split}.txt").is_file():
            return _ids(self.root / f"{split}.txt")
        images = self.root / "images"
        if not images.is_dir():
            raise DataError(f"{images}: folder layout needs an images/ folder")
        stems = sorted(p.stem for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        random.Random(seed).shuffle(stems)
        n_val = max(1, round(len(stems) * val_fraction))
        return sorted(stems[:n_val] if split in ("val", "test") else stems[n_val:])

    def image_path(self, stem: str) -> Path:
        folder = {"pascal_context": "JPEGImages", "nyud": "images", "folder": "images"}[self.layout]
        p = _find(self.root / folder, stem, IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS))
        if p is None:
            raise DataError(f"{self.root / folder}: no image for {stem!r}")
        return p

    def task_dir(self, task: str) -> Path:
        if self.layout == "pascal_context":
            return self.root / {"semseg": "semseg/pascal-context", "human_parts": "human_parts",
                                "saliency": "sal_distill", "normals": "normals_distill"}[task]
        if self.layout == "nyud":
            return self.root / {"semseg": "segmentation", "depth": "depth", "normals": "normals", "edges": "edge"}[task]
        return self.root / task

    @property
    def context_dir(self) -> Path:
        """PASCAL-Context's full label maps (459 classes), which select the pixels normals count on."""
        return self.root / "pascal-context" / "trainval"

    def label_path(self, stem: str, task: str) -> Path | None:
        exts = {"human_parts": (".mat", ".png")} if self.layout == "pascal_context" else {}
        return _find(self.task_dir(task), stem, exts.get(task, (".png", ".npy")))

    # --- items ---------------------------------------------------------------------------
    def __len__(self):
        return len(self.ids)

    def read_label(self, path: Path, task: Task, shape) -> torch.Tensor:
        """The label at the image's resolution: (H, W) long for classes / binary, (3, H, W) / (1, H, W) float."""
        if path.suffix == ".mat":
            arr = read_human_parts(path, shape)
        else:
            arr = read_map(path)
        if arr.shape[:2] != tuple(shape):
            raise DataError(f"{path}: label map is {arr.shape[0]}x{arr.shape[1]}, its image is {shape[0]}x{shape[1]}")
        if task.kind == "classes":
            arr = arr[..., 0] if arr.ndim == 3 else arr
            lab = torch.from_numpy(arr.astype(np.int64))
            if self.layout == "nyud":  # 1..40, 0 unlabelled
                lab = torch.where(lab == 0, IGNORE, lab - 1)
            bad = (lab != IGNORE) & ((lab < 0) | (lab >= task.channels))
            if bad.any():
                raise DataError(f"{path}: class id {int(lab[bad][0])} outside the {task.name} task's "
                                f"{task.channels} classes (0..{task.channels - 1}, {IGNORE} = ignore)")
            return lab
        if task.kind == "binary":
            arr = arr[..., 0] if arr.ndim == 3 else arr
            thr = 0.5 if arr.dtype.kind == "f" or arr.max(initial=0) <= 1 else 127
            return torch.from_numpy((arr > thr).astype(np.int64))
        if task.kind == "normals":
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise DataError(f"{path}: normals need 3 channels, got shape {arr.shape}")
            n = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)
            return n * 2 / 255 - 1 if arr.dtype == np.uint8 else n
        d = torch.from_numpy(arr.astype(np.float32))
        d = d / 1000 if arr.dtype == np.uint16 else d  # 16-bit PNG depth in mm
        return d.reshape(1, *d.shape[:2])

    def empty_label(self, task: Task, shape) -> torch.Tensor:
        if task.kind in ("classes", "binary"):
            return torch.full(shape, IGNORE, dtype=torch.long)
        return torch.zeros(task.channels, *shape)  # normals all zero / depth 0: invalid

    def __getitem__(self, i):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        item = self._load(i)
        if self._cache is not None:
            self._cache[i] = item
        return item

    def _load(self, i):
        stem = self.ids[i]
        img = read_image(self.image_path(stem))
        shape = img.shape[:2]
        labels = {}
        for name, task in self.tasks.items():
            path = self.label_path(stem, name) if self.present[i][name] else None
            lab = self.read_label(path, task, shape) if path is not None else self.empty_label(task, shape)
            if name == "normals" and self.normals_mask and path is not None:
                keep = np.isin(read_context_labels(self.context_dir / f"{stem}.mat", shape), list(NORMALS_CONTEXT_CLASSES))
                lab = lab * torch.from_numpy(keep)
            labels[name] = resize_label(lab, self.size)
        return {"image": image_tensor(img, self.size), "labels": labels, "stem": stem}


def image_tensor(img: np.ndarray, size: int) -> torch.Tensor:
    """The model input of an (H, W, 3) uint8 image: (3, size, size), resized bilinearly and normalised
    with the ImageNet mean / std (training and vision.predict both use this)."""
    x = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return (x - MEAN) / STD


def resize_label(lab: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour resize (labels are never blended)."""
    if lab.shape[-2:] == (size, size):
        return lab
    x = lab[None, None].float() if lab.ndim == 2 else lab[None].float()
    x = F.interpolate(x, size=(size, size), mode="nearest")
    return x[0, 0].long() if lab.ndim == 2 else x[0]


def collate(items):
    return {"image": torch.stack([it["image"] for it in items]),
            "labels": {t: torch.stack([it["labels"][t] for it in items]) for t in items[0]["labels"]},
            "stem": [it["stem"] for it in items]}


class DenseDataModule(L.LightningDataModule):
    """Train / val splits of a multi-task dense dataset (the val split is also tested)."""

    def __init__(self, root: str, layout: str = "pascal_context", tasks: list[str] | None = None,
                 size: int = 224, batch_size: int = 8, num_workers: int = 0, missing: str = "skip",
                 num_classes: dict[str, int] | None = None, seed: int = 0, cache: bool = False):
        super().__init__()
        self.kw = dict(root=root, layout=layout, tasks=tasks, size=size, missing=missing,
                       num_classes=num_classes, seed=seed, cache=cache)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set = MultiTaskDense(split="train", **self.kw)
        self.val_set = MultiTaskDense(split="val", **self.kw)
        self.tasks = self.train_set.tasks

    def _loader(self, ds, shuffle):
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle,
                                           num_workers=self.num_workers, collate_fn=collate)

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False)

    def test_dataloader(self):
        return self._loader(self.val_set, False)
