"""Synthetic multi-task scenes written in the PASCAL-Context and NYUD multi-task layouts.

Each scene: a textured ground plane, 1-2 objects (squares = class 1 "aeroplane" slot, discs =
class 2) and often a "person" (class 15) made of head / torso / arms / legs with PASCAL-Part part
masks; saliency = every object's pixels; normals from simple 3D geometry (tilted ground plane,
discs as hemispheres, squares facing the camera); depth grows towards the top of the ground plane
and objects stand in front of it. The PASCAL-Context layout also gets the full label maps
(`pascal-context/trainval/<id>.mat`, 459-class ids: ground 189, box 37, ball 10, person 284), so
normals count only on the objects and persons (the ground is not a NYUD-v2 class), as on the real
data. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PERSON_CLASS, SQUARE_CLASS, DISC_CLASS = 15, 1, 2
CONTEXT_IDS = {0: 189, SQUARE_CLASS: 37, DISC_CLASS: 10, PERSON_CLASS: 284}  # -> full PASCAL-Context ids
COLOURS = {SQUARE_CLASS: (200, 60, 50), DISC_CLASS: (50, 90, 210), PERSON_CLASS: (230, 190, 150)}


def _scene(rng: np.random.Generator, size: int):
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[...] = rng.uniform(60, 140, 3)
    img += 25 * np.sin(xx[..., None] / rng.uniform(3, 8) + rng.uniform(0, 6))  # ground texture
    sem = np.zeros((h, w), np.uint8)
    normals = np.zeros((h, w, 3), np.float32)
    normals[...] = (0.0, -0.5, 0.866)  # ground plane tilted towards the camera
    depth = 2.0 + 6.0 * (1 - yy / h)   # farther towards the top
    parts = []  # (part_name, mask)
    person = None
    for _ in range(rng.integers(1, 3)):
        cls = int(rng.choice([SQUARE_CLASS, DISC_CLASS]))
        r = rng.integers(size // 8, size // 4)
        cy, cx = rng.integers(r, h - r), rng.integers(r, w - r)
        if cls == SQUARE_CLASS:
            m = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            normals[m] = (0, 0, 1)
        else:
            d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2
            m = d2 <= 1
            nz = np.sqrt(np.clip(1 - d2, 0, 1))
            normals[m] = np.stack([(xx - cx) / r, (yy - cy) / r, nz], -1)[m]
        sem[m], depth[m] = cls, rng.uniform(1.0, 2.0)
        img[m] = np.array(COLOURS[cls]) + rng.normal(0, 10, (int(m.sum()), 3))
    if rng.random() < 0.7:  # a person: head, torso, arms, legs
        s = size / 64
        cx, top = rng.integers(int(14 * s), int(size - 14 * s)), rng.integers(0, int(size - 46 * s))
        boxes = {"head": (top, top + 8 * s, cx - 4 * s, cx + 4 * s), "torso": (top + 8 * s, top + 24 * s, cx - 6 * s, cx + 6 * s),
                 "luarm": (top + 8 * s, top + 16 * s, cx - 10 * s, cx - 6 * s), "llarm": (top + 16 * s, top + 24 * s, cx - 10 * s, cx - 6 * s),
                 "ruarm": (top + 8 * s, top + 16 * s, cx + 6 * s, cx + 10 * s), "rlarm": (top + 16 * s, top + 24 * s, cx + 6 * s, cx + 10 * s),
                 "luleg": (top + 24 * s, top + 34 * s, cx - 5 * s, cx - 1 * s), "llleg": (top + 34 * s, top + 44 * s, cx - 5 * s, cx - 1 * s),
                 "ruleg": (top + 24 * s, top + 34 * s, cx + 1 * s, cx + 5 * s), "rlleg": (top + 34 * s, top + 44 * s, cx + 1 * s, cx + 5 * s)}
        shade = {"head": 1.0, "torso": 0.55, "luarm": 0.8, "ruarm": 0.8, "llarm": 0.95, "rlarm": 0.95,
                 "luleg": 0.4, "ruleg": 0.4, "llleg": 0.25, "rlleg": 0.25}
        person = np.zeros((h, w), bool)
        for name, (y0, y1, x0, x1) in boxes.items():
            m = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
            parts.append((name, m.astype(np.uint8)))
            person |= m
            img[m] = np.array(COLOURS[PERSON_CLASS]) * shade[name] + rng.normal(0, 8, (int(m.sum()), 3))
        sem[person], depth[person], normals[person] = PERSON_CLASS, 1.5, (0, 0, 1)
        for k, (name, m) in enumerate(parts):  # later objects (none) cannot hide parts; keep masks in person
            parts[k] = (name, (m.astype(bool) & person).astype(np.uint8))
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return img, sem, parts, person, normals, depth.astype(np.float32)


def _write_parts(path: Path, parts, person) -> None:
    from scipy.io import savemat

    objects = []
    if person is not None:
        objects.append({"class": "person", "class_ind": PERSON_CLASS, "mask": person.astype(np.uint8),
                        "parts": np.array([{"part_name": n, "mask": m} for n, m in parts], dtype=object)})
    objs = np.empty(len(objects), dtype=object)
    for i, o in enumerate(objects):
        objs[i] = o
    savemat(path, {"anno": {"imname": path.stem, "objects": objs}})


def write_pascal_context_like(root, train: int = 48, val: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Synthetic scenes in the PASCAL-Context multi-task layout; returns `root`."""
    root = Path(root)
    from scipy.io import savemat

    for d in ("JPEGImages", "semseg/pascal-context", "human_parts", "sal_distill", "normals_distill", "ImageSets/Context",
              "pascal-context/trainval"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {"train": [], "val": []}
    for i in range(train + val):
        stem = f"2008_{i:06d}"
        splits["train" if i < train else "val"].append(stem)
        img, sem, parts, person, normals, _ = _scene(rng, size)
        Image.fromarray(img).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        Image.fromarray(sem).save(root / "semseg/pascal-context" / f"{stem}.png")
        Image.fromarray(((sem > 0) * 255).astype(np.uint8)).save(root / "sal_distill" / f"{stem}.png")
        Image.fromarray(np.round((normals + 1) / 2 * 255).astype(np.uint8)).save(root / "normals_distill" / f"{stem}.png")
        context = np.vectorize(CONTEXT_IDS.get)(sem).astype(np.uint16)
        savemat(root / "pascal-context/trainval" / f"{stem}.mat", {"LabelMap": context})
        if person is not None:  # PASCAL-Context ships part files only for images with annotated persons
            _write_parts(root / "human_parts" / f"{stem}.mat", parts, person)
    for split, ids in splits.items():
        (root / "ImageSets/Context" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_nyud_like(root, train: int = 12, val: int = 4, size: int = 48, seed: int = 0) -> Path:
    """Synthetic scenes in the NYUD-v2 multi-task layout (semseg 1..40 with 0 unlabelled, depth,
    normals and edges as .npy); returns `root`."""
    root = Path(root)
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {"train": [], "val": []}
    for i in range(train + val):
        stem = f"{i:04d}"
        splits["train" if i < train else "val"].append(stem)
        img, sem, _, _, normals, depth = _scene(rng, size)
        nyu = np.where(sem == PERSON_CLASS, 31, np.where(sem > 0, sem + 1, 1)).astype(np.uint8)  # 1 = wall ... 31 = person
        edge = np.zeros(sem.shape, np.float32)
        edge[:-1] += sem[:-1] != sem[1:]
        edge[:, :-1] += sem[:, :-1] != sem[:, 1:]
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        Image.fromarray(nyu).save(root / "segmentation" / f"{stem}.png")
        np.save(root / "depth" / f"{stem}.npy", depth)
        np.save(root / "normals" / f"{stem}.npy", normals.astype(np.float32))
        np.save(root / "edge" / f"{stem}.npy", (edge > 0).astype(np.float32))
    for split, ids in splits.items():
        (root / "gt_sets" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
