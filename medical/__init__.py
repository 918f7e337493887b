"""Medical: DINOv2 on radiology (kNN and linear probes, few-shot, PEFT, 2D / 3D classification and
segmentation with MONAI)."""
from shared.moved import install as _install_moved

_install_moved({"medical.datasets": "medical.data"})
