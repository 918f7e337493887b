"""`python -m medical.predict --adapter <bundle> image.(png|jpg|dcm|nii.gz|npy) [...]`

Classification bundles (from `medical.train` or `medical.probe`) print class probabilities (2D
images, or 3D volumes aggregated over slices); segmentation bundles (`medical.segment`) write
each predicted mask into `--out` at the INPUT's resolution: PNG for 2D, NIfTI for 3D (with the
input's affine when the input is NIfTI). Only the bundle is needed: it names its backbone,
preprocessing and labels. 2D images are predicted --batch-size at a time (a volume on its own, its
slices --batch-size per forward), decoded by --workers processes meanwhile; each batch's results are
printed (in the order given) as soon as it is done. Files that cannot be read are reported as they
are read (one line each on stderr) and the others are still predicted; the exit code is then 2. A DICOM whose Modality / BodyPartExamined differs from the images the
bundle was trained on (its `input` field) is predicted with a one-line warning naming the file.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medical.io import ImageReadError, dicom_tags, read_image
from medical.transforms import to_model_input, volume_to_slices
from medical.volumes import classify
from shared import peft
from shared.cli import positive_int, stream_results, unique_stems
from shared.hub import resolve_adapter
from shared.predict import (
    Loaded,
    add_arguments,
    default_batch_size,
    model_device,
    predict_batches,
    resolve,
    stacked,
)

PIPELINE = "medical.transforms.to_model_input"
EPILOG = """\
output: per classified file, its path, then one line per class: "  <probability>  <label>"
(softmax, or sigmoid per label for multi-label bundles); per segmented file "mask written to <path>".
exit codes: 0 all files predicted; 2 a bad bundle or argument (nothing predicted), or at least one
file could not be read (the others were predicted; each bad file is named on stderr).
"""


def check_bundle(meta: dict, where: str) -> None:
    """Refuse, in one line, a bundle this command cannot run (another domain or input kind)."""
    pre = meta.get("preprocessing") or {}
    bb = (meta.get("backbone") or {}).get("id")
    if pre.get("frontend"):
        raise peft.BundleError(f"{where}: an audio bundle (frontend {pre['frontend']!r}, backbone {bb!r}); "
                               f"medical.predict runs medical image bundles: use python -m audio.predict")
    if pre.get("pipeline") != PIPELINE:
        raise peft.BundleError(f"{where}: preprocessing.pipeline is {pre.get('pipeline')!r}; medical.predict needs a "
                               f"bundle trained on medical images by medical.train / probe / segment ({PIPELINE!r})")
    task = meta.get("task", "classification")
    if task not in ("classification", "segmentation"):
        raise peft.BundleError(f"{where}: task {task!r}; medical.predict classifies or segments images")


def _inputs(img: np.ndarray, pre: dict, path: str) -> tuple[torch.Tensor, bool, int]:
    """(model input, is_volume, slice axis): (1, 3, S, S) for 2D, (1, D, 3, S, S) for 3D.

    NIfTI volumes are sliced along their last (axial) axis; .npy volumes along the axis the
    training data used (`volume_axis` in the bundle's preprocessing).
    """
    size, intensity = pre.get("size", 224), pre.get("intensity", "minmax")
    if isinstance(intensity, list):
        intensity = tuple(intensity)
    if img.ndim == 3 and img.shape[-1] not in (3, 4):
        axis = img.ndim - 1 if ".nii" in Path(path).name else pre.get("volume_axis", 0) % img.ndim
        return volume_to_slices(img, size, intensity, axis=axis)[None], True, axis
    return to_model_input(img, size, intensity)[None], False, -1


def _read(f: str) -> np.ndarray:
    if Path(f).is_dir():
        raise ImageReadError(f"{f}: is a folder, not an image file (give the image files inside it)")
    return read_image(f)


def load_classifier(bundle: Path):
    """The bundle's classifier in eval mode, and how to compute logits from a 2D batch."""
    model = peft.from_bundle(bundle).eval()
    meta = model.bundle_meta
    probe = meta.get("probe")
    if not probe:
        return model, lambda x: classify(model, x, meta.get("slice_pool", "cls"))
    from medical.backbone import probe_features
    from medical.probes import variants

    def logits(x):  # a linear probe of medical.probe reads the study's feature bank
        if x.ndim == 5:
            raise ImageReadError("a linear-probe bundle classifies 2D images")
        feats = variants(probe_features(model.backbone, x, probe["blocks"]), probe["blocks"])[probe["feature"]]
        return model.head.fc(feats)

    return model, logits


def input_warning(meta: dict, path: str) -> str | None:
    """One line when a DICOM file's Modality / BodyPartExamined is not what the bundle was trained on
    (its `input` model-card field, e.g. {"modality": "CR/DX", "body_part": "CHEST"}; "/" separates
    the values it accepts); None when they match, are not recorded, or the file is not DICOM."""
    want = meta.get("input") or (meta.get("preprocessing") or {}).get("input") or {}
    if not want:
        return None
    tags = dicom_tags(path)
    problems = []
    for tag, key in (("Modality", "modality"), ("BodyPartExamined", "body_part")):
        allowed = {v.strip().upper() for v in re.split(r"[/,]", str(want.get(key) or "")) if v.strip()}
        got = tags.get(tag)
        if allowed and got and got.upper() not in allowed:
            problems.append(f"{tag} {got}")
    if not problems:
        return None
    trained = " ".join(str(want[k]) for k in ("modality", "body_part") if want.get(k))
    return (f"{path}: DICOM {', '.join(problems)}, but this adapter was trained on {trained} images; "
            f"its prediction for this file is not meaningful")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _check_kind(f: str, is_volume: bool, pre: dict, probe: bool) -> None:
    if not is_volume and "volume_axis" in pre:
        raise ImageReadError(f"{f}: a 2D image, but this bundle classifies 3D volumes (give a .nii.gz / .npy volume)")
    if is_volume and "volume_axis" not in pre:
        raise ImageReadError(f"{f}: a 3D volume, but this bundle classifies 2D images "
                             f"(give one slice as PNG/DICOM, or use a bundle trained on volumes)")
    if is_volume and probe:
        raise ImageReadError(f"{f}: a 3D volume; a linear-probe bundle classifies 2D images")


def load_for_classify(f: str, meta: dict) -> Loaded:
    """One file's model input for a classification bundle: (3, S, S) for a 2D image, (D, 3, S, S)
    for a volume (predicted on its own: its slices are the batch). Raises `ImageReadError` naming
    the file; a DICOM of another modality / body part carries its warning."""
    pre = meta.get("preprocessing") or {}
    x, is_volume, _ = _inputs(_read(f), pre, f)
    _check_kind(f, is_volume, pre, bool(meta.get("probe")))
    mismatch = input_warning(meta, f)
    return Loaded(x[0], warnings=(mismatch,) if mismatch else (), alone=is_volume)


def iter_classify(bundle: Path, files: list[str], top_k: int = 5, warn=_warn, batch_size: int | None = None,
                  workers: int = 0):
    """Yield, in the order given, (file, [(label, probability), ...]) per file, `batch_size` images
    per forward (default 16 on the CPU; a volume alone) decoded by `workers` processes (0: here),
    as each batch is done; a file that cannot be read yields its `ImageReadError` as soon as it is
    read. A DICOM whose modality / body part differs from what the bundle was trained on is still
    classified, after `warn(input_warning(...))`."""
    model, logits_of = load_classifier(bundle)
    meta = model.bundle_meta
    multilabel = bool(meta.get("multilabel"))
    labels = model.labels or [str(i) for i in range(model.head.num_classes)]

    def run(xs: list[torch.Tensor]) -> list:
        with torch.inference_mode():
            rows = stacked(xs, logits_of)
        out = []
        for logits in rows:
            probs = logits.sigmoid() if multilabel else logits.softmax(-1)
            order = probs.argsort(descending=True)[:top_k]
            out.append([(labels[i], probs[i].item()) for i in order.tolist()])
        return out

    load = functools.partial(load_for_classify, meta=meta)
    yield from predict_batches(files, load, run, batch_size=batch_size or default_batch_size(model_device(model)),
                               workers=workers, errors=(ImageReadError,), warn=warn)


def _collect(items, errors: list[str] | None) -> list:
    out = []
    for item in items:
        if isinstance(item, ImageReadError):
            if errors is None:
                raise item
            errors.append(str(item))
        else:
            out.append(item)
    return out


def classify_files(bundle: Path, files: list[str], top_k: int = 5, errors: list[str] | None = None):
    """[(file, [(label, probability), ...])] for the files that could be read; the others' messages go
    to `errors` (raised when `errors` is None)."""
    return _collect(iter_classify(bundle, files, top_k), errors)


def segment_at(backbone, decoder, slices: torch.Tensor, size: tuple[int, int], batch: int = 16) -> np.ndarray:
    """(D, 3, S, S) preprocessed slices -> (D, H, W) labels: logits resized (bilinear) to the input's
    in-plane size, then argmax; `batch` slices per forward."""
    return np.stack(segment_images(backbone, decoder, slices, [tuple(size)] * len(slices), batch))


def segment_images(backbone, decoder, xs: torch.Tensor, sizes: list[tuple[int, int]], batch: int = 16) -> list[np.ndarray]:
    """(B, 3, S, S) preprocessed images -> one (H, W) uint8 label map per image at its own size
    (`sizes`): logits resized bilinearly to that size, then argmax; `batch` images per forward."""
    from medical.segmentation import Segmenter

    model = Segmenter(backbone, decoder).eval()
    ref = next(backbone.parameters())
    out = []
    with torch.inference_mode():
        for i in range(0, len(xs), batch):
            logits = model(xs[i:i + batch].to(ref.device, ref.dtype))
            for row, size in zip(logits, sizes[i:i + batch]):
                row = row[None]
                if tuple(row.shape[-2:]) != tuple(size):
                    row = F.interpolate(row.float(), size=tuple(size), mode="bilinear", align_corners=False)
                out.append(row.argmax(1)[0].cpu().numpy().astype(np.uint8))
    return out


def load_for_segment(item: tuple[str, str], meta: dict) -> Loaded:
    """One (file, output stem)'s input for a segmentation bundle: a 2D image's (3, S, S) and size,
    or a volume's (D, 3, S, S) slices, in-plane size, slice axis and affine (predicted on its own:
    its slices are the batch)."""
    f, stem = item
    pre = meta.get("preprocessing") or {}
    img = _read(f)
    x, is_volume, axis = _inputs(img, pre, f)
    mismatch = input_warning(meta, f)
    data = {"file": f, "stem": stem, "x": x[0], "volume": is_volume, "axis": axis}
    if is_volume:
        data["size"] = tuple(n for i, n in enumerate(img.shape) if i != axis)
        if ".nii" in Path(f).name:
            import nibabel as nib

            data["affine"] = nib.load(str(f)).affine
    else:
        data["size"] = tuple(img.shape[:2])
    return Loaded(data, warnings=(mismatch,) if mismatch else (), alone=is_volume)


def iter_segment(bundle: Path, files: list[str], out_dir: Path, warn=_warn, batch_size: int | None = None,
                 workers: int = 0):
    """Yield, in the order given, the path of each file's predicted mask as it is written (2D
    images `batch_size` per forward, default 16 on the CPU; a volume on its own, `batch_size`
    slices per forward) or, for a file that cannot be read, its `ImageReadError` as soon as it is
    read."""
    from medical.segmentation import load_segmenter

    backbone, decoder, meta = load_segmenter(bundle)
    batch_size = batch_size or default_batch_size(model_device(backbone))
    # a/ct.nii.gz and b/ct.nii.gz: a_ct_mask / b_ct_mask, never one overwriting the other
    stems = unique_stems(files, stem=lambda p: p.name.split(".")[0])

    def run(items: list[dict]) -> list:
        """(what writing the mask needs, the mask at the input's size) per input."""
        if items[0]["volume"]:  # alone: its slices are the batch
            (v,) = items
            masks = [np.moveaxis(segment_at(backbone, decoder, v["x"], v["size"], batch_size), 0, v["axis"])]
        else:
            masks = segment_images(backbone, decoder, torch.stack([v["x"] for v in items]),
                                   [v["size"] for v in items], batch_size)
        return [({k: x for k, x in v.items() if k != "x"}, mask) for v, mask in zip(items, masks)]

    load = functools.partial(load_for_segment, meta=meta)
    results = predict_batches(list(zip(files, stems)), load, run, batch_size=batch_size, workers=workers,
                              errors=(ImageReadError,), warn=warn)
    scale = 255 // max(1, len(meta.get("labels") or []) - 1, 1)  # visible grey levels per class
    for item in results:
        if isinstance(item, ImageReadError):
            yield item
            continue
        _, (v, mask) = item
        out_dir.mkdir(parents=True, exist_ok=True)
        if v["volume"]:
            import nibabel as nib

            path = out_dir / f"{v['stem']}_mask.nii.gz"
            affine = v.get("affine", np.eye(4))
            _save_atomic(path, lambda tmp, m=mask, a=affine: nib.save(nib.Nifti1Image(m, a), str(tmp)))
        else:
            from PIL import Image

            path = out_dir / f"{v['stem']}_mask.png"
            _save_atomic(path, lambda tmp, m=mask: Image.fromarray(m * scale).save(tmp, format="PNG"))
        yield path


def segment_files(bundle: Path, files: list[str], out_dir: Path, errors: list[str] | None = None) -> list[Path]:
    """The masks written for the files that could be read (each printed as "mask written to <path>");
    the others' messages go to `errors` (raised when `errors` is None)."""
    written = _collect(iter_segment(bundle, files, out_dir), errors)
    for path in written:
        print(f"mask written to {path}")
    return written


def _save_atomic(path: Path, write) -> None:
    from shared.fs import atomic_path

    with atomic_path(path, suffix="".join(path.suffixes)) as tmp:  # nibabel reads .nii.gz from the name
        write(tmp)


def show(item) -> None:
    """Print one result as it comes: a mask's path, or a file's classes."""
    if isinstance(item, Path):
        print(f"mask written to {item}")
        return
    name, top = item
    print(name)
    for label, score in top:
        print(f"  {score:6.3f}  {label}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m medical.predict", description=__doc__.split("\n\n")[1],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, metavar="BUNDLE",
                    help="bundle written by medical.train / probe / segment: a folder (adapter.json + "
                         "adapter.safetensors), a catalogue name (python -m shared.hub list), hf://owner/name[@rev] "
                         "or https://.../bundle.zip#sha256=...")
    ap.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                    help="classification: print the K most probable classes per file (default 5)")
    ap.add_argument("--out", type=Path, default=Path("predictions"), metavar="FOLDER",
                    help="segmentation: folder for the predicted masks, <name>_mask.png / .nii.gz (default ./predictions; "
                         "inputs sharing a name get their parent folder in it: a_ct_mask, b_ct_mask)")
    add_arguments(ap, "images")
    ap.add_argument("files", nargs="+", metavar="FILE",
                    help="images: .png .jpg .dcm (2D), .nii / .nii.gz / .npy (3D volumes or 2D arrays)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    errors: list[str] = []
    _, workers = resolve(args)  # the batch size follows the model's device (iter_classify / iter_segment)

    def results():
        adapter = resolve_adapter(args.adapter)  # a folder, catalogue name or reference; a typo names the closest
        meta = peft.read_meta(adapter)
        check_bundle(meta, f"{args.adapter} (adapter.json)")
        if meta.get("task") == "segmentation":
            yield from iter_segment(adapter, args.files, args.out, batch_size=args.batch_size, workers=workers)
        else:
            yield from iter_classify(adapter, args.files, args.top_k, batch_size=args.batch_size, workers=workers)

    return stream_results(results(), show, errors, (peft.BundleError, ImageReadError))

if __name__ == "__main__":
    sys.exit(main())
