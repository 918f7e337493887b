"""MedMNIST v2 / MedMNIST+ `.npz` files (2D and 3D), official splits."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ..transforms import to_model_input, volume_to_slices
from .base import SPLITS, DatasetLayoutError, MedicalDataModule, Split

log = logging.getLogger(__name__)


_ORGANS_2D = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
              "lung-right", "pancreas", "spleen"]
# MedMNIST v2 label names (index order), from the official INFO of the medmnist package.
MEDMNIST_LABELS: dict[str, list[str]] = {
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
                  "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
    "chestmnist": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                   "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"],
    "tissuemnist": ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
                    "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
                    "Thick Ascending Limb"],
    "organamnist": _ORGANS_2D,
    "organcmnist": _ORGANS_2D,
    "organsmnist": _ORGANS_2D,
    "organmnist3d": ["liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder", "heart",
                     "lung-right", "lung-left", "spleen", "pancreas"],
    "nodulemnist3d": ["benign", "malignant"],
    "adrenalmnist3d": ["normal", "hyperplasia"],
    "fracturemnist3d": ["buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"],
    "vesselmnist3d": ["vessel", "aneurysm"],
    "synapsemnist3d": ["inhibitory synapse", "excitatory synapse"],
}
MEDMNIST_MULTILABEL = {"chestmnist"}
# What each MedMNIST set's images are (its source datasets), as DICOM Modality / BodyPartExamined
# values; written into bundles (preprocessing.input) for medical.predict's modality check.
_XRAY_CHEST = {"modality": "CR/DX", "body_part": "CHEST"}
MEDMNIST_IMAGING: dict[str, dict[str, str]] = {
    "pathmnist": {"modality": "SM", "body_part": "COLON"},
    "chestmnist": _XRAY_CHEST,
    "dermamnist": {"modality": "XC", "body_part": "SKIN"},
    "octmnist": {"modality": "OPT", "body_part": "EYE"},
    "pneumoniamnist": _XRAY_CHEST,
    "retinamnist": {"modality": "OP", "body_part": "EYE"},
    "breastmnist": {"modality": "US", "body_part": "BREAST"},
    "bloodmnist": {"modality": "SM"},
    "tissuemnist": {"modality": "SM", "body_part": "KIDNEY"},
    "organamnist": {"modality": "CT", "body_part": "ABDOMEN"},
    "organcmnist": {"modality": "CT", "body_part": "ABDOMEN"},
    "organsmnist": {"modality": "CT", "body_part": "ABDOMEN"},
    "organmnist3d": {"modality": "CT", "body_part": "ABDOMEN"},
    "nodulemnist3d": {"modality": "CT", "body_part": "CHEST"},
    "adrenalmnist3d": {"modality": "CT", "body_part": "ABDOMEN"},
    "fracturemnist3d": {"modality": "CT", "body_part": "CHEST"},
    "vesselmnist3d": {"modality": "MR", "body_part": "HEAD"},
}


class MedMNISTDataModule(MedicalDataModule):
    """MedMNIST v2 / MedMNIST+ `.npz` (keys train/val/test _images / _labels), official splits.

    `root` is the `.npz` file or a folder holding `<flag>.npz` (size 28) or `<flag>_<size>.npz`.
    A file's name gives the flag and size (`breastmnist_224.npz` -> breastmnist, 224); an explicit
    `flag` / `size` that disagrees with the name is refused (the label names depend on the flag).
    A folder root needs `flag`. Images (N, H, W) or (N, H, W, 3) are 2D; (N, D, H, W) are 3D
    volumes, yielded as (D, 3, S, S) slice stacks (axis 0). Labels (N, 1) are single-label,
    (N, C > 1) multi-label (ChestMNIST). Label names come from `MEDMNIST_LABELS`; an unknown
    flag gets "class_i".
    """

    name = "medmnist"
    protocol = "official splits"
    FILE_NAME = re.compile(r"^(?P<flag>[a-z0-9]+?)(?:_(?P<size>\d+))?\.npz$")

    def __init__(self, root: str, flag: str | None = None, size: int | None = None, **kw):
        path = Path(root).expanduser()
        flag = flag.lower() if flag else None
        if path.is_file():
            m = self.FILE_NAME.match(path.name.lower())
            file_flag = m["flag"] if m else None
            file_size = int(m["size"]) if m and m["size"] else 28
            if file_flag in MEDMNIST_LABELS:
                if flag is not None and flag != file_flag:
                    raise DatasetLayoutError(f"{path}: the file name says flag {file_flag!r} but flag is {flag!r} "
                                             f"(label names differ between flags); drop --data.flag or rename")
                if size is not None and int(size) != file_size:
                    raise DatasetLayoutError(f"{path}: the file name says size {file_size} but size is {size}")
                flag, size = file_flag, file_size
            elif flag is None:
                flag = path.stem.lower()  # not a MedMNIST name: generic class names, said below
                log.warning("%s: file name is not <flag>[_<size>].npz of a known MedMNIST flag; labels are "
                            "class_0.. (set flag for the official names)", path)
        elif flag is None:
            raise DatasetLayoutError(f"{path}: a folder root needs flag (e.g. pneumoniamnist) to pick the .npz file")
        self.flag, self.size = flag, int(size or 28)
        self.name = self.flag if self.size == 28 else f"{self.flag}_{self.size}"
        super().__init__(root, **kw)

    def _npz_path(self) -> Path:
        if self.root.is_file():
            return self.root
        names = [f"{self.flag}_{self.size}.npz"]
        if self.size == 28:
            names.insert(0, f"{self.flag}.npz")
        for n in names:
            if (self.root / n).is_file():
                return self.root / n
        raise DatasetLayoutError(f"{self.root}: no MedMNIST file {' or '.join(names)}")

    def read_splits(self) -> dict[str, Split]:
        path = self.npz_path = self._npz_path()
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = set(z.files)
                want = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
                missing = [k for k in want if k not in keys]
                if missing:
                    raise DatasetLayoutError(f"{path}: missing key(s) {missing}; found {sorted(keys)}")
                arrays = {k: z[k] for k in want}
        except DatasetLayoutError:
            raise
        except Exception as err:
            raise DatasetLayoutError(f"{path}: not a readable .npz ({type(err).__name__}: {err})") from err

        ndims = {arrays[f"{s}_images"].ndim for s in SPLITS}
        shapes = {arrays[f"{s}_images"].shape[1:] for s in SPLITS}
        if len(shapes) != 1:
            raise DatasetLayoutError(f"{path}: image shapes differ between splits: {sorted(shapes)}")
        shape = shapes.pop()
        if ndims != {3} and ndims != {4}:
            raise DatasetLayoutError(f"{path}: train_images must be (N, H, W), (N, H, W, 3) or (N, D, H, W); "
                                     f"got (N, {', '.join(map(str, shape))})")
        self.volumetric = len(shape) == 3 and shape[-1] != 3

        labels: dict[str, np.ndarray] = {}
        for s in SPLITS:
            y = arrays[f"{s}_labels"]
            y = y[:, None] if y.ndim == 1 else y
            if y.ndim != 2 or len(y) != len(arrays[f"{s}_images"]):
                raise DatasetLayoutError(f"{path}: {s}_labels has shape {arrays[f'{s}_labels'].shape}, expected "
                                         f"(N, 1) or (N, C) with N = {len(arrays[f'{s}_images'])}")
            if not np.issubdtype(y.dtype, np.integer) and not np.array_equal(y, np.round(y)):
                raise DatasetLayoutError(f"{path}: {s}_labels has non-integer values")
            labels[s] = y.astype(np.int64)
        cols = {y.shape[1] for y in labels.values()}
        if len(cols) != 1:
            raise DatasetLayoutError(f"{path}: label columns differ between splits: {sorted(cols)}")
        n_cols = cols.pop()
        known = MEDMNIST_LABELS.get(self.flag)
        self.multilabel = n_cols > 1
        if self.flag in MEDMNIST_MULTILABEL and not self.multilabel:
            raise DatasetLayoutError(f"{path}: {self.flag} is multi-label but the labels have one column")

        splits = {}
        if self.multilabel:
            if known is not None and n_cols != len(known):
                raise DatasetLayoutError(f"{path}: labels have {n_cols} columns, {self.flag} has {len(known)} labels")
            self.labels = list(known) if known else [f"class_{i}" for i in range(n_cols)]
            for s in SPLITS:
                if not np.isin(labels[s], (0, 1)).all():
                    bad = labels[s][~np.isin(labels[s], (0, 1))][0]
                    raise DatasetLayoutError(f"{path}: {s}_labels has value {bad}; multi-label targets must be 0 or 1")
                splits[s] = Split([(s, i) for i in range(len(labels[s]))], labels[s].astype(np.float32))
        else:
            n = len(known) if known else int(max(y.max() for y in labels.values())) + 1
            self.labels = list(known) if known else [f"class_{i}" for i in range(n)]
            for s in SPLITS:
                y = labels[s][:, 0]
                bad = y[(y < 0) | (y >= n)]
                if len(bad):
                    raise DatasetLayoutError(f"{path}: {s}_labels has class id {bad[0]} outside 0..{n - 1} "
                                             f"({self.flag} has {n} classes)")
                splits[s] = Split([(s, i) for i in range(len(y))], y)
        self._images = {s: arrays[f"{s}_images"] for s in SPLITS}
        return splits

    def load(self, item, augment=None):
        split, i = item
        img = self._images[split][i]
        if self.volumetric:
            return volume_to_slices(img, self.img_size, self.intensity, axis=0, augment=augment)
        return to_model_input(img, self.img_size, self.intensity, augment)

    def preprocessing_extra(self) -> dict:
        return {"volume_axis": 0} if self.volumetric else {}

    def imaging_default(self) -> dict[str, str]:
        return dict(MEDMNIST_IMAGING.get(self.flag, {}))
