"""From a raw medical image to the (3, S, S) tensor a DINOv2 backbone takes.

The pipeline, the same for every data module and for inference (it is stored in adapter
bundles as `preprocessing_dict(...)`):

1. Intensity to [0, 1] (MONAI `ScaleIntensity` / `ScaleIntensityRangePercentiles` /
   `ScaleIntensityRange`), chosen by ``intensity``:

   * ``"minmax"`` (default): ``(x - min) / (max - min)`` over the whole image (all colour
     channels together, so colours keep their balance). A constant image becomes all zeros.
   * ``"percentile"``: the 0.5th and 99.5th percentiles map to 0 and 1, values outside are
     clipped: robust to a few hot pixels, burnt-in text or metal. (Inputs above 4M voxels take
     the percentiles from an evenly strided subsample.)
   * ``(lo, hi)``: a fixed window, clipped (e.g. ``(-160, 240)`` Hounsfield units for abdominal
     CT): the only choice that gives every scan the same mapping.

   A volume is scaled with statistics of the WHOLE volume (not per slice), so a slice keeps
   its brightness relative to its neighbours; 2D slices cut from a volume for training
   (Decathlon) use the same whole-volume statistics.
2. Resize to S x S with bilinear interpolation and anti-aliasing (`torch.nn.functional.interpolate`
   with ``antialias=True``, the same filter torchvision / PIL use for DINOv2's own transforms);
   the aspect ratio is not kept (chest X-rays are close to square).
3. Optional train-time augmentation (OFF by default): MONAI `RandFlipd` (left-right, p=0.5) and
   `RandRotated` (+-10 degrees, p=0.5, zero padding), applied to the [0, 1] image and, with
   nearest-neighbour interpolation, to its mask.
4. Grayscale replicated to 3 channels.
5. ImageNet normalisation, ``(x - mean) / std`` with mean (0.485, 0.456, 0.406) and std
   (0.229, 0.224, 0.225) (DINOv2 was trained with ImageNet statistics).

Inputs are channels-last NumPy arrays as `medical.io.read_image` returns them: (H, W),
(H, W, 1) or (H, W, 3); volumes (D, H, W) are cut along axis 0 unless told otherwise.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PERCENTILES",
    "Intensity",
    "check_intensity",
    "scale_intensity",
    "to_model_input",
    "mask_to_size",
    "volume_to_slices",
    "preprocessing_dict",
    "augmentation",
    "finish",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLES = 4_000_000
Intensity = Union[str, Sequence[float]]  # "minmax" | "percentile" | (lo, hi)

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def check_intensity(intensity: Intensity) -> Intensity:
    if isinstance(intensity, str):
        if intensity not in ("minmax", "percentile"):
            raise ValueError(f"intensity must be 'minmax', 'percentile' or (lo, hi), got {intensity!r}")
        return intensity
    lo_hi = tuple(float(v) for v in intensity)
    if len(lo_hi) != 2 or not lo_hi[0] < lo_hi[1]:
        raise ValueError(f"an intensity window must be (lo, hi) with lo < hi, got {intensity!r}")
    return lo_hi


def _plain(x: Any) -> torch.Tensor:
    """A MONAI MetaTensor (or array) as a plain float32 torch tensor (cheaper to collate)."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x, dtype=torch.float32)


def scale_intensity(x: np.ndarray | torch.Tensor, intensity: Intensity = "minmax") -> torch.Tensor:
    """`x` (any shape) scaled to [0, 1] as float32, with statistics over all of `x` (see module docs)."""
    from monai.transforms import ScaleIntensity, ScaleIntensityRange

    intensity = check_intensity(intensity)
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x.float())
    if intensity == "minmax":
        out = ScaleIntensity(minv=0.0, maxv=1.0)(t)
    elif intensity == "percentile":
        # Percentiles from at most ~4M evenly strided voxels (exact for 2D images; a CT volume's
        # full sort would cost seconds per load), then MONAI's clipped linear mapping.
        flat = t.flatten()
        flat = flat[:: max(1, math.ceil(flat.numel() / _PERCENTILE_SAMPLES))].double()
        lo, hi = torch.quantile(flat, torch.tensor(PERCENTILES, dtype=torch.float64) / 100).tolist()
        if hi <= lo:
            return torch.zeros_like(t)
        out = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(t)
    else:
        out = ScaleIntensityRange(a_min=intensity[0], a_max=intensity[1], b_min=0.0, b_max=1.0, clip=True)(t)
    return _plain(out)


def _channels_first(img: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(img, dtype=np.float32) if not isinstance(img, torch.Tensor) else img.float())
    if t.ndim == 2:
        return t[None]
    if t.ndim == 3 and t.shape[-1] in (1, 3):
        return t.permute(2, 0, 1)
    raise ValueError(f"expected a channels-last image (H, W), (H, W, 1) or (H, W, 3), got shape {tuple(t.shape)}")


def _resize(chw: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(chw.shape[-2:]) == (size, size):
        return chw
    return F.interpolate(chw[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp_(0.0, 1.0)


def _normalise(chw01: torch.Tensor) -> torch.Tensor:
    """(1 or 3, S, S) in [0, 1] -> (3, S, S) ImageNet-normalised; also works on (D, 1|3, S, S)."""
    if chw01.shape[-3] == 1:
        chw01 = chw01.expand(*chw01.shape[:-3], 3, *chw01.shape[-2:])
    return (chw01 - _MEAN) / _STD


def finish(chw01: torch.Tensor, size: int, augment: Callable | None = None,
           mask: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-5 on an image already in [0, 1], (C, H, W) with C = 1 or 3.

    With `mask` ((H, W) integer) also returns the mask resized (nearest) and, when `augment`
    is given, flipped / rotated exactly as the image: ``(x (3, S, S), mask (S, S) long)``.
    """
    x = _resize(chw01, size)
    m = mask_to_size(mask, size) if mask is not None else None
    if augment is not None:
        data = augment({"image": x} if m is None else {"image": x, "mask": m[None].float()})
        x = _plain(data["image"])
        if m is not None:
            m = _plain(data["mask"])[0].round().long()
    x = _normalise(x)
    return x if m is None else (x, m)


def to_model_input(img: np.ndarray | torch.Tensor, size: int = 224, intensity: Intensity = "minmax",
                   augment: Callable | None = None) -> torch.Tensor:
    """A channels-last 2D image -> (3, size, size) float32, ImageNet-normalised (module docstring)."""
    chw = _channels_first(img)
    return finish(scale_intensity(chw, intensity), size, augment)


def mask_to_size(mask: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """An integer mask (H, W) -> (size, size) int64 by nearest neighbour (pixel-centre aligned).

    A stack (D, H, W) gives (D, size, size), each slice resized alone.
    """
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if m.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) mask or a (D, H, W) stack, got shape {tuple(m.shape)}")
    if tuple(m.shape[-2:]) == (size, size):
        return m.long()
    stack = m.reshape(-1, 1, *m.shape[-2:]).float()
    out = F.interpolate(stack, size=(size, size), mode="nearest-exact")[:, 0].round().long()
    return out.reshape(*m.shape[:-2], size, size)


def volume_to_slices(vol: np.ndarray | torch.Tensor, size: int = 224, intensity: Intensity = "minmax",
                     axis: int = 0, augment: Callable | None = None, scaled: bool = False) -> torch.Tensor:
    """A (D, H, W) volume -> (D, 3, size, size): slices along `axis`, whole-volume intensity scaling.

    `scaled=True` says `vol` is already in [0, 1] (skips step 1). `augment` (if given) flips /
    rotates every slice the same way.
    """
    t = torch.as_tensor(np.asarray(vol, dtype=np.float32) if not isinstance(vol, torch.Tensor) else vol.float())
    if t.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {tuple(t.shape)}")
    t = torch.movedim(t, axis, 0)
    if not scaled:
        t = scale_intensity(t, intensity)
    t = _resize(t, size)  # slices act as channels: one interpolate call for the whole volume
    if augment is not None:
        t = _plain(augment({"image": t})["image"])
    return _normalise(t[:, None])


def augmentation(segmentation: bool = False, seed: int | None = 0, degrees: float = 10.0):
    """The optional train-time augmentation: random left-right flip and small rotation (MONAI).

    Works on a dict {"image": (C, S, S) in [0, 1]} (plus "mask": (1, S, S) float when
    `segmentation`); returns the MONAI `Compose`, seeded with `seed` (data loader workers
    reseed it, see `medical.data`).
    """
    from monai.transforms import Compose, RandFlipd, RandRotated

    keys = ["image", "mask"] if segmentation else ["image"]
    modes = ("bilinear", "nearest") if segmentation else ("bilinear",)
    t = Compose([
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotated(keys, range_x=math.radians(degrees), prob=0.5, mode=modes, padding_mode="zeros",
                    keep_size=True),
    ])
    if seed is not None:
        t.set_random_state(seed=seed)
    return t


def preprocessing_dict(size: int = 224, intensity: Intensity = "minmax", **extra: Any) -> dict:
    """A JSON-friendly description of this pipeline (stored in adapter bundles, part of cache keys).

    Augmentation is not part of it: it only acts on training batches.
    """
    intensity = check_intensity(intensity)
    d = {
        "pipeline": "medical.transforms.to_model_input",
        "size": int(size),
        "intensity": intensity if isinstance(intensity, str) else list(intensity),
        "resize": "bilinear, antialias",
        "channels": 3,
        "grayscale": "replicate",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "volume_scaling": "whole volume",
    }
    if intensity == "percentile":
        d["percentiles"] = list(PERCENTILES)
    d.update(extra)
    return d
