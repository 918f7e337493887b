"""The dense tasks: output channels, loss, the metric Delta_m compares, and how a map is drawn."""
from __future__ import annotations

from dataclasses import dataclass

IGNORE = 255  # label value never scored (class maps)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str            # "classes" | "binary" | "normals" | "depth"
    channels: int        # decoder output channels
    metric: str          # the metric Delta_m uses
    lower_is_better: bool = False


def make_task(name: str, num_classes: int | None = None) -> Task:
    """semseg / human_parts take `num_classes` (PASCAL-Context 21 / parts 7 / NYUD 40 by default)."""
    if name in ("semseg", "human_parts"):
        n = num_classes or {"semseg": 21, "human_parts": 7}[name]
        return Task(name, "classes", n, "miou")
    if name == "saliency":
        return Task(name, "binary", 1, "maxf")
    if name == "edges":
        return Task(name, "binary", 1, "maxf")
    if name == "normals":
        return Task(name, "normals", 3, "mean_angle", lower_is_better=True)
    if name == "depth":
        return Task(name, "depth", 1, "rmse", lower_is_better=True)
    raise ValueError(f"unknown task {name!r}; known: semseg, human_parts, saliency, edges, normals, depth")


# PASCAL-Context body parts (PASCAL-Part part names -> 6 parts + background), the grouping the
# public multi-task PASCAL-Context code uses: head, torso, upper arms, lower arms + hands,
# upper legs, lower legs + feet.
HUMAN_PARTS = {
    **{p: 1 for p in ("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye")},
    "neck": 2, "torso": 2, "luarm": 3, "ruarm": 3, "llarm": 4, "rlarm": 4, "lhand": 4, "rhand": 4,
    "luleg": 5, "ruleg": 5, "llleg": 6, "rlleg": 6, "lfoot": 6, "rfoot": 6,
}
PERSON = "person"

# PASCAL-Context surface normals are pseudo labels distilled from a model trained on NYUD-v2; the
# benchmark scores (and trains) them only where the full PASCAL-Context label (the 459-class
# `LabelMap` of `pascal-context/trainval/<id>.mat`) is a class that NYUD-v2's vocabulary also has
# (plus tvmonitor): these are those classes' ids. Other pixels are unlabelled (normal vector 0).
NORMALS_CONTEXT_CLASSES = frozenset({
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55,
    56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115,
    122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197,
    199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255,
    260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309,
    310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379,
    380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440,
    441, 442, 443, 444, 446, 454, 457
})
