"""`python -m medical.predict --adapter <bundle> image.(png|jpg|dcm|nii.gz|npy) [...]`

Classification bundles (from `medical.train` or `medical.probe`) print class probabilities (2D
images, or 3D volumes aggregated over slices); segmentation bundles (`medical.segment`) write
each predicted mask into `--out` at the INPUT's resolution: PNG for 2D, NIfTI for 3D (with the
input's affine when the input is NIfTI). Only the bundle is needed: it names its backbone,
preprocessing and labels. Each file's result is printed as soon as it is done; files that cannot
be read are reported as they come (one line each on stderr) and the others are still predicted;
the exit code is then 2. A DICOM whose Modality / BodyPartExamined differs from the images the
bundle was trained on (its `input` field) is predicted with a one-line warning naming the file.
"""
from __future__ import annotations

import argparse
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


def iter_classify(bundle: Path, files: list[str], top_k: int = 5, warn=_warn):
    """Yield, file by file as each is done, (file, [(label, probability), ...]) or, for a file that
    cannot be read, its `ImageReadError`. A DICOM whose modality / body part differs from what the
    bundle was trained on is still classified, after `warn(input_warning(...))`."""
    model, logits_of = load_classifier(bundle)
    meta = model.bundle_meta
    pre = meta.get("preprocessing") or {}
    multilabel = bool(meta.get("multilabel"))
    labels = model.labels or [str(i) for i in range(model.head.num_classes)]
    for f in files:
        try:
            x, is_volume, _ = _inputs(_read(f), pre, f)
            if not is_volume and "volume_axis" in pre:
                raise ImageReadError(f"{f}: a 2D image, but this bundle classifies 3D volumes (give a .nii.gz / .npy volume)")
            if is_volume and "volume_axis" not in pre:
                raise ImageReadError(f"{f}: a 3D volume, but this bundle classifies 2D images "
                                     f"(give one slice as PNG/DICOM, or use a bundle trained on volumes)")
        except ImageReadError as e:
            yield e
            continue
        mismatch = input_warning(meta, f)
        if mismatch:
            warn(mismatch)
        with torch.inference_mode():
            logits = logits_of(x)[0]
        probs = logits.sigmoid() if multilabel else logits.softmax(-1)
        order = probs.argsort(descending=True)[:top_k]
        yield f, [(labels[i], probs[i].item()) for i in order.tolist()]


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
    in-plane size, then argmax."""
    from medical.segmentation import Segmenter

    model = Segmenter(backbone, decoder).eval()
    ref = next(backbone.parameters())
    out = []
    with torch.inference_mode():
        for i in range(0, len(slices), batch):
            logits = model(slices[i:i + batch].to(ref.device, ref.dtype))
            if tuple(logits.shape[-2:]) != tuple(size):
                logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
            out.append(logits.argmax(1).cpu())
    return torch.cat(out).numpy().astype(np.uint8)


def iter_segment(bundle: Path, files: list[str], out_dir: Path, warn=_warn):
    """Yield, file by file as each is written, the path of its predicted mask or, for a file that
    cannot be read, its `ImageReadError`."""
    from medical.segmentation import load_segmenter

    backbone, decoder, meta = load_segmenter(bundle)
    pre = meta.get("preprocessing") or {}
    # a/ct.nii.gz and b/ct.nii.gz: a_ct_mask / b_ct_mask, never one overwriting the other
    stems = unique_stems(files, stem=lambda p: p.name.split(".")[0])
    for f, stem in zip(files, stems):
        try:
            img = _read(f)
            x, is_volume, axis = _inputs(img, pre, f)
        except ImageReadError as e:
            yield e
            continue
        mismatch = input_warning(meta, f)
        if mismatch:
            warn(mismatch)
        out_dir.mkdir(parents=True, exist_ok=True)
        if is_volume:
            import nibabel as nib

            in_plane = [n for i, n in enumerate(img.shape) if i != axis]
            mask = np.moveaxis(segment_at(backbone, decoder, x[0], in_plane), 0, axis)  # the input's shape
            affine = nib.load(str(f)).affine if ".nii" in Path(f).name else np.eye(4)
            path = out_dir / f"{stem}_mask.nii.gz"
            _save_atomic(path, lambda tmp: nib.save(nib.Nifti1Image(mask, affine), str(tmp)))
        else:
            from PIL import Image

            mask = segment_at(backbone, decoder, x, img.shape[:2])[0]
            path = out_dir / f"{stem}_mask.png"
            scale = 255 // max(1, len(meta.get("labels") or []) - 1, 1)  # visible grey levels per class
            _save_atomic(path, lambda tmp: Image.fromarray(mask * scale).save(tmp, format="PNG"))
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
    ap.add_argument("files", nargs="+", metavar="FILE",
                    help="images: .png .jpg .dcm (2D), .nii / .nii.gz / .npy (3D volumes or 2D arrays)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    errors: list[str] = []

    def results():
        adapter = resolve_adapter(args.adapter)  # a folder, catalogue name or reference; a typo names the closest
        meta = peft.read_meta(adapter)
        check_bundle(meta, f"{args.adapter} (adapter.json)")
        if meta.get("task") == "segmentation":
            yield from iter_segment(adapter, args.files, args.out)
        else:
            yield from iter_classify(adapter, args.files, args.top_k)

    return stream_results(results(), show, errors, (peft.BundleError, ImageReadError))

if __name__ == "__main__":
    sys.exit(main())
