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
