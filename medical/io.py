"""Read medical images and label masks into NumPy arrays, with one error type for every bad file.

`read_image(path)` returns float32:

* PNG / JPEG / BMP / TIFF (PIL): (H, W) for grayscale (L, I;16, I, F, 1, LA), (H, W, 3) for
  everything else (RGB, RGBA, palette, CMYK are converted to RGB). Channels stay LAST.
* DICOM (`.dcm`, `.dicom`, or a file without extension that pydicom can parse): the pixel data
  after the Modality LUT (RescaleSlope / RescaleIntercept, e.g. to Hounsfield units);
  MONOCHROME1 (white = low values) is inverted within its own value range
  (``x -> max + min - x``) so that high values are always bright. (H, W) for one frame,
  (frames, H, W) for multi-frame, (H, W, 3) for colour.
* NIfTI (`.nii`, `.nii.gz`, nibabel): the data array with scl_slope / scl_inter applied, in the
  stored voxel order (no reorientation): 2D, 3D (x, y, z) or 4D (x, y, z, channel).
* NumPy `.npy` (no pickles).

`read_mask(path)` reads the same formats and returns int64: palette PNGs give their palette
indices, grey PNGs their grey values, NIfTI/DICOM/npy values must be integers.

Every problem raises `ImageReadError` (a ValueError) whose message starts with the file and says
why: missing file, unsupported extension, unreadable or corrupt content (random bytes, truncated
files), an empty array, or non-finite values.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["ImageReadError", "SUPPORTED_EXTENSIONS", "read_image", "read_mask", "check_same_shape", "image_kind",
           "dicom_tags"]

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
SUPPORTED_EXTENSIONS = PIL_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS + (".npy",)

_GREY_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "1"}


class ImageReadError(ValueError):
    """An image or mask file cannot be used; the message names the file (or files) and the reason."""


def image_kind(path: str | Path) -> str | None:
    """'pil', 'dicom', 'nifti' or 'npy' from the file name; None when the extension is unsupported.

    A file without any extension is taken as DICOM (PACS exports often have none).
    """
    name = Path(path).name.lower()
    if name.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    suffix = Path(name).suffix
    if suffix in PIL_EXTENSIONS:
        return "pil"
    if suffix in DICOM_EXTENSIONS or suffix == "":
        return "dicom"
    if suffix == ".npy":
        return "npy"
    return None


# --------------------------------------------------------------------------- format readers


def _read_pil(path: Path, mask: bool) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later
        mode = im.mode
        if mask:
            if mode in _GREY_MODES or mode == "P":  # palette masks: the index is the label
                return np.asarray(im)
            if mode in ("LA", "La"):
                return np.asarray(im.convert("L"))
            rgb = np.asarray(im.convert("RGB"))
            if (rgb == rgb[..., :1]).all():  # a grey mask saved as RGB
                return rgb[..., 0]
            raise ImageReadError(f"{path}: colour mask (mode {mode}); expected a single-channel or palette "
                                 "index mask")
        if mode in _GREY_MODES:
            return np.asarray(im)
        if mode in ("LA", "La"):
            return np.asarray(im.convert("L"))
        return np.asarray(im.convert("RGB"))


def _read_dicom(path: Path, mask: bool) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(f"{path}: DICOM file has no pixel data")
    arr = ds.pixel_array
    if mask:
        return arr
    arr = apply_modality_lut(arr, ds)  # RescaleSlope / RescaleIntercept or a Modality LUT
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.astype(np.float64)
        arr = arr.max() + arr.min() - arr
    return arr


def _read_nifti(path: Path, mask: bool) -> np.ndarray:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj) if mask else img.get_fdata(dtype=np.float32)


def read_spacing(path: str | Path) -> tuple[float, ...] | None:
    """Voxel / pixel spacing in mm per array axis of a NIfTI (header zooms of the spatial axes) or
    DICOM (PixelSpacing: rows, columns); None for formats without one (PNG, JPEG, npy)."""
    path = Path(path)
    kind = image_kind(path)
    try:
        if kind == "nifti":
            import nibabel as nib

            img = nib.load(str(path))
            return tuple(float(z) for z in img.header.get_zooms()[:3])
        if kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            return tuple(float(v) for v in ds.PixelSpacing) if "PixelSpacing" in ds else None
    except Exception as err:
        raise ImageReadError(f"{path}: cannot read the voxel spacing ({type(err).__name__}: {err})") from err
    return None


def dicom_tags(path: str | Path, names: tuple[str, ...] = ("Modality", "BodyPartExamined")) -> dict[str, str]:
    """{tag name: value} of the `names` a DICOM file has (the header only; empty values left out);
    {} for a file of another format or one pydicom cannot parse (read_image reports those)."""
    path = Path(path)
    if image_kind(path) != "dicom":
        return {}
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - read_image names the file and the reason
        return {}
    return {n: str(ds.get(n)).strip() for n in names if str(ds.get(n) or "").strip()}


def _read_npy(path: Path, mask: bool) -> np.ndarray:
    return np.load(path, allow_pickle=False)


_READERS = {"pil": _read_pil, "dicom": _read_dicom, "nifti": _read_nifti, "npy": _read_npy}


def _read(path: str | Path, mask: bool) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if not path.is_file():
        raise ImageReadError(f"{path}: not a file")
    kind = image_kind(path)
    if kind is None:
        raise ImageReadError(f"{path}: unsupported file type {path.suffix!r} "
                             f"(supported: {', '.join(SUPPORTED_EXTENSIONS)}, or DICOM without extension)")
    try:
        arr = _READERS[kind](path, mask)
    except ImageReadError:
        raise
    except Exception as err:  # each library raises its own types for corrupt / truncated files
        raise ImageReadError(f"{path}: cannot read as {kind} ({type(err).__name__}: {err})") from err
    arr = np.asarray(arr)
    if arr.size == 0:
        raise ImageReadError(f"{path}: empty image (shape {arr.shape})")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageReadError(f"{path}: unsupported pixel type {arr.dtype}")
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """The image as float32 (see the module docstring for the shape per format)."""
    arr = _read(path, mask=False).astype(np.float32)
    bad = arr.size - int(np.isfinite(arr).sum())
    if bad:
        raise ImageReadError(f"{path}: {bad} non-finite value(s) (NaN or inf)")
    return arr


def read_mask(path: str | Path) -> np.ndarray:
    """A label mask as int64; float files must hold whole numbers (a NIfTI label map stored as float)."""
    arr = _read(path, mask=True)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{path}: mask has non-finite value(s) (NaN or inf)")
        rounded = np.rint(arr)
        if not np.allclose(arr, rounded, atol=1e-3):
            raise ImageReadError(f"{path}: mask has non-integer values (e.g. {arr[arr != rounded].flat[0]!r})")
        arr = rounded
    return arr.astype(np.int64)


def check_same_shape(image: np.ndarray, mask: np.ndarray, image_path: str | Path, mask_path: str | Path) -> None:
    """Raise ImageReadError naming both files unless `mask` covers `image` pixel for pixel.

    The image may carry one extra trailing channel axis: (H, W, 3) with an (H, W) mask, or a
    multi-modal (H, W, D, C) volume with an (H, W, D) label map.
    """
    ishape, mshape = tuple(np.shape(image)), tuple(np.shape(mask))
    if ishape == mshape or (len(ishape) == len(mshape) + 1 and ishape[:-1] == mshape):
        return
    raise ImageReadError(f"image {image_path} has shape {ishape} but mask {mask_path} has shape {mshape}")
