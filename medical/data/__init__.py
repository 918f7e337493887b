"""Lightning data modules for radiology, one file per dataset family: MedMNIST, NIH ChestX-ray14, CheXpert, image folders, lung
masks (Montgomery / Shenzhen) and the Medical Segmentation Decathlon.

Every module reads its dataset's official on-disk layout (never the network) and knows its labels
right after construction, so the CLI can link `data.num_classes`, `data.labels`,
`data.multilabel` and `data.preprocessing` into the model. Common constructor arguments:
``root, img_size=224, batch_size=32, num_workers=0, few_shot=None, seed=0, augment=False,
intensity="minmax"`` (see `medical.transforms` for the preprocessing; `augment` turns on the
train-time random flip / rotation).

Batches
-------
* classification, 2D: ``(x (B, 3, S, S) float32, y)``; 3D volumes (MedMNIST3D):
  ``x (B, D, 3, S, S)``, slices along the first axis.
* ``y``: int64 ``(B,)`` when single-label; float32 ``(B, C)`` multi-hot when ``multilabel``
  (ChestX-ray14, ChestMNIST, CheXpert). With CheXpert ``uncertainty="ignore"`` the uncertain
  entries are NaN: the loss must mask them, e.g. `masked_bce` below (and metrics must skip them).
* segmentation (LungMask, Decathlon): ``(x (B, 3, S, S), mask (B, S, S) int64)``, mask values in
  ``range(num_classes)``, class 0 = background.

Few-shot (``few_shot=k``) keeps k training units per class with `shared.data.few_shot_indices`
(rarest class first, seeded); units are patients where the dataset has patient ids (ChestX-ray14
"Patient ID", CheXpert's patientNNNNN folder), images otherwise. Multi-label: a sample counts for
the classes where its target is 1, so all-negative samples ("No Finding" in ChestX-ray14) are never
drawn. Segmentation: k training images (LungMask) or k training volumes (Decathlon). A class with
fewer than k units raises ValueError naming the class. Validation and test splits are never cut.

Layout problems raise `DatasetLayoutError` (a ValueError) naming the file and field; an unusable
image or mask raises `medical.io.ImageReadError` naming the file(s).
"""
from __future__ import annotations

from .base import (
    DatasetLayoutError,
    MedicalDataModule,
    Split,
    masked_bce,
    stratified_split,
)
from .chestxray14 import CXR14_LABELS, ChestXray14DataModule
from .chexpert import CHEXPERT_COMPETITION, CHEXPERT_LABELS, CheXpertDataModule
from .decathlon import DecathlonDataModule
from .image_folder import ImageFolderDataModule
from .lung_masks import LungMaskDataModule
from .medmnist import MEDMNIST_LABELS, MedMNISTDataModule

__all__ = [
    "DatasetLayoutError",
    "Split",
    "MedicalDataModule",
    "MedMNISTDataModule",
    "ChestXray14DataModule",
    "CheXpertDataModule",
    "ImageFolderDataModule",
    "LungMaskDataModule",
    "DecathlonDataModule",
    "masked_bce",
    "stratified_split",
    "MEDMNIST_LABELS",
    "CXR14_LABELS",
    "CHEXPERT_LABELS",
    "CHEXPERT_COMPETITION",
    "DATASETS",
]

DATASETS = {
    "medmnist": MedMNISTDataModule,
    "chestxray14": ChestXray14DataModule,
    "chexpert": CheXpertDataModule,
    "imagefolder": ImageFolderDataModule,
    "lungmask": LungMaskDataModule,
    "decathlon": DecathlonDataModule,
}
