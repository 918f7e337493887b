"""Predict every task of a multi-task bundle on images; one PNG per task and image.

    python -m vision.predict --adapter runs/vision_demo/multi_polyhistor_lite/adapter --out runs/vision_pred img.jpg ...

Class maps are colour-coded (a fixed palette), saliency / edges as grey probability maps,
normals as RGB ((n + 1) / 2 * 255), depth as a colour map (near = bright). These maps are data
(one pixel per image pixel); each carries its legend as PNG text ("Description": the class names
with their colours, or the encoding). `<stem>_overview.png` shows them readably: the image and
every task's map with a title, a legend of the classes present (the bundle's class names),
colour bars (saliency / edges: probability 0-1; depth: relative, 1 = nearest) and a note on the
normals' RGB encoding (`--no-overview` skips it).

Maps have the image's resolution, at most --max-side pixels on the long side (default 1024; 0:
full size): a larger photo is reduced while it is decoded (JPEG DCT scaling, box filter), never
held as a full-size float array. 8- and 16-bit pictures (16-bit grey PNG / TIFF, 32-bit I / F)
are scaled by their bit depth. Each map is written atomically as <out>/<stem>_<task>.png; two
inputs with the same stem (a/photo.jpg, b/photo.png) get their parent folder in the name
(a_photo_*, b_photo_*), so no output of a call overwrites another. Images are predicted
--batch-size at a time (each resized to the model's input; the maps resized back to each image's
own size), decoded by --workers processes meanwhile. One line per image, printed as soon as its
files are written (in the order given, batch by batch), maps the image to its files. Unreadable
files and folders are named on stderr as they are read, the others predicted, and the exit code is 2.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.cli import stream_results, unique_stems
from shared.fs import atomic_path
from shared.predict import (
    add_arguments,
    default_batch_size,
    model_device,
    predict_batches,
    resolve,
    stacked,
)

from .data import DataError, image_tensor
from .images import read_picture

MAX_SIDE = 1024  # long side of the maps written (--max-side); the models see 224-512 px


def palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), n x 3 uint8."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def render(kind: str, out: torch.Tensor) -> np.ndarray:
    """(C, H, W) decoder output -> (H, W[, 3]) uint8 picture."""
    if kind == "classes":
        return palette(out.shape[0])[out.argmax(0).numpy()]
    if kind == "binary":
        return (out[0].sigmoid().numpy() * 255).round().astype(np.uint8)
    if kind == "normals":
        n = F.normalize(out, dim=0).permute(1, 2, 0).numpy()
        return ((n + 1) / 2 * 255).round().clip(0, 255).astype(np.uint8)
    import matplotlib

    d = out[0].numpy()
    lo, hi = float(d.min()), float(d.max())
    z = 1 - (d - lo) / (hi - lo if hi > lo else 1)  # near = 1
    return (matplotlib.colormaps["magma"](z)[..., :3] * 255).round().astype(np.uint8)


# Class names of the public layouts, by (layout, task); index = channel (NYUD-v2's labels 1..40 are channels 0..39).
VOC = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
PARTS = ["background", "head", "torso", "upper arms", "lower arms + hands", "upper legs", "lower legs + feet"]
NYU40 = ["wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
         "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes",
         "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard",
         "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "other structure", "other furniture",
         "other prop"]
CLASS_NAMES = {("pascal_context", "semseg"): VOC, ("pascal_context", "human_parts"): PARTS, ("nyud", "semseg"): NYU40}
NORMALS_NOTE = ("surface normals as colour: R, G, B = (n_x + 1) / 2, (n_y + 1) / 2, (n_z + 1) / 2 of the unit "
                "normal (x 255), in the dataset's camera frame")
LEGEND_MAX = 12  # classes listed in an overview legend (the largest by area; the rest counted)


def class_names(meta: dict, task: str, n: int) -> list[str]:
    """The names of a class task's n channels: the bundle's own (`vision.tasks.<task>.classes`), else
    those of its layout's public dataset, else "class i"."""
    v = (meta or {}).get("vision") or {}
    own = ((v.get("tasks") or {}).get(task) or {}).get("classes")
    if isinstance(own, list) and len(own) == n:
        return [str(c) for c in own]
    known = CLASS_NAMES.get((v.get("layout"), task))
    return list(known) if known is not None and len(known) == n else [f"class {i}" for i in range(n)]


def description(kind: str, names: list[str] | None = None) -> str:
    """The legend a map PNG carries as text: what a pixel value means."""
    if kind == "classes":
        pal = palette(len(names or []))
        return "class map, PASCAL VOC palette: " + "; ".join(
            f"{i} {n} = RGB({', '.join(map(str, pal[i]))})" for i, n in enumerate(names or []))
    if kind == "binary":
        return "probability map: grey level / 255 = probability (0-1)"
    if kind == "normals":
        return NORMALS_NOTE
    return "relative depth, magma colour map: bright = near, dark = far (normalised per image)"


def class_ids(picture: np.ndarray, n: int) -> np.ndarray:
    """A rendered class map (H, W, 3) back to class ids (H, W): the palette colours are distinct."""
    pal = palette(n).astype(np.int64)
    code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(code)
    px = picture.astype(np.int64)
    idx = np.searchsorted(code[order], (px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2])
    return order[np.clip(idx, 0, n - 1)]


def overview(image: np.ndarray, maps: dict[str, np.ndarray], kinds: dict[str, str], names: dict[str, list[str]],
             title: str):
    """The image and every task's map, each readable on its own (a matplotlib Figure, Agg): a title per
    panel; class maps with a legend of the classes present (name, colour, share of the pixels);
    probability maps with a 0-1 colour bar; depth with a relative colour bar; normals with a note on
    their RGB encoding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    n = 1 + len(maps)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.0 * cols, 4.4 * rows), layout="constrained", squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[n:]:
        ax.remove()
    axes = axes[:n]
    axes[0].imshow(image.astype(np.uint8) if image.dtype != np.uint8 else image)
    axes[0].set_title("input", fontsize=9)
    for ax, (task, pic) in zip(axes[1:], maps.items()):
        kind = kinds[task]
        if kind == "classes":
            k = len(names[task])
            ids = class_ids(pic, k)
            counts = np.bincount(ids.ravel(), minlength=k)
            present = [int(c) for c in np.argsort(-counts) if counts[c] > 0]
            ax.imshow(pic)
            pal = palette(k) / 255.0
            handles = [mpatches.Patch(facecolor=pal[c], edgecolor="0.3", label=f"{names[task][c]} "
                                      f"({100 * counts[c] / ids.size:.0f}%)") for c in present[:LEGEND_MAX]]
            if len(present) > LEGEND_MAX:
                handles.append(mpatches.Patch(facecolor="none", edgecolor="none",
                                              label=f"+{len(present) - LEGEND_MAX} more classes"))
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7, ncol=2,
                      frameon=False, title="class (share of pixels)", title_fontsize=7)
            ax.set_title(f"{task}: predicted class", fontsize=9)
        elif kind == "binary":
            im = ax.imshow(pic.astype(np.float32) / 255.0, cmap="gray", vmin=0.0, vmax=1.0)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="probability (0-1)")
            ax.set_title(f"{task}: probability", fontsize=9)
        elif kind == "normals":
            ax.imshow(pic)
            ax.set_title(f"{task}: surface normals", fontsize=9)
            ax.text(0.5, -0.03, "colour = surface normal: R, G, B =\n(n_x + 1) / 2, (n_y + 1) / 2, (n_z + 1) / 2\n"
                    "of the unit normal (x 255), in the dataset's camera frame", transform=ax.transAxes,
                    ha="center", va="top", fontsize=7)
        else:
            ax.imshow(pic)
            sm = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap="magma")
            fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.02, label="relative depth (1 = nearest)")
            ax.set_title(f"{task}: depth", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig


def write_map(dest: Path, arr: np.ndarray, text: str) -> None:
    """One map PNG, atomically (a crash never leaves a torn PNG under the final name), its legend as text."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Description", text)
    with atomic_path(dest) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", pnginfo=info)


def write_overview(dest: Path, fig) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def _pixels(text: str) -> int:
    """argparse type of --max-side: 0 (full size) or a positive number of pixels."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (full size) or a positive number of pixels, got {text}")
    return value


def read_image(path: Path, max_side: int | None = MAX_SIDE) -> np.ndarray:
    """(H, W, 3) in 0..255 (uint8, or float32 for high bit depths), at most `max_side` on the long
    side, reduced while decoding (`vision.images.read_picture`); DataError naming the file."""
    if Path(path).is_dir():
        raise DataError(f"{path}: is a folder, not an image")
    try:
        return read_picture(path, max_side)
    except Exception as e:  # noqa: BLE001 - report any decoder failure with the file name
        raise DataError(f"{path}: cannot read image ({e})") from None


def maps_at(model, outs: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Each task's (C, h, w) decoder output resized bilinearly to the image's `size`, then rendered."""
    return {t: render(model.tasks[t].kind, F.interpolate(o[None], size=tuple(size), mode="bilinear",
                                                         align_corners=False)[0])
            for t, o in outs.items()}


@torch.no_grad()
def predict(model, image_path: Path, max_side: int | None = MAX_SIDE) -> dict[str, np.ndarray]:
    """Each task's map at the image's resolution, at most `max_side` on the long side (logits resized
    bilinearly, then decoded)."""
    img = read_image(image_path, max_side)
    outs = model(image_tensor(img, model.image_size)[None])
    return maps_at(model, {t: o[0] for t, o in outs.items()}, img.shape[:2])


def load_image(item: tuple[Path, str], image_size: int, max_side: int | None = MAX_SIDE,
               overview: bool = True) -> dict:
    """One (image, output stem)'s model input (3, S, S) at the model's size, the size its maps get
    (the image's, at most `max_side`) and, for the overview, the picture at most 512 px; DataError
    naming the file."""
    f, stem = item
    img = read_image(f, max_side)
    return {"file": f, "stem": stem, "x": image_tensor(img, image_size), "size": tuple(img.shape[:2]),
            "picture": read_image(f, 512) if overview else None}


def iter_outputs(model, files: list[Path], max_side: int | None = MAX_SIDE, overview: bool = True,
                 batch_size: int | None = None, workers: int = 0):
    """Yield, in the order given, (image, stem, size, overview picture or None, {task: (C, h, w)
    decoder output}) per image, `batch_size` images per forward (default 16 on the CPU; every image
    is resized to the model's input, so any sizes stack), decoded by `workers` processes (0: here),
    as each batch is done; an image that cannot be read yields its DataError as soon as it is read."""
    model.eval()

    def run(items: list[dict]) -> list:
        with torch.inference_mode():
            outs = stacked([v["x"] for v in items], model)
        return [(v["file"], v["stem"], v["size"], v["picture"], o) for v, o in zip(items, outs)]

    load = functools.partial(load_image, image_size=model.image_size, max_side=max_side, overview=overview)
    for item in predict_batches(list(zip(files, unique_stems(files))), load, run,
                                batch_size=batch_size or default_batch_size(model_device(model)),
                                workers=workers, errors=(DataError,)):
        yield item if isinstance(item, DataError) else item[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vision.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="a bundle folder written by vision.train (<output_dir>/adapter)")
    ap.add_argument("--out", default="runs/vision_predictions",
                    help="folder for <image stem>_<task>.png (the parent folder joins the stem when two inputs "
                         "share one: a_photo_<task>.png, b_photo_<task>.png)")
    ap.add_argument("--max-side", type=_pixels, default=MAX_SIDE, metavar="PX",
                    help=f"long side of the maps in pixels; larger images are reduced while decoded "
                         f"(default {MAX_SIDE}; 0 keeps the full resolution)")
    ap.add_argument("--no-overview", action="store_true",
                    help="write only the maps, not <image stem>_overview.png (the image and every map, with legends)")
    add_arguments(ap, "images")
    ap.add_argument("images", nargs="+", help="image files (JPEG / PNG / TIFF / BMP; 8 or 16 bit)")
    a = ap.parse_args(argv)
    from shared import peft
    from shared.hub import resolve_adapter

    from .train import load_bundle

    try:
        bundle = resolve_adapter(a.adapter)  # a folder, catalogue name or reference
        model = load_bundle(bundle)
        meta = peft.read_meta(bundle)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    kinds = {t: task.kind for t, task in model.tasks.items()}
    ref = Path(a.adapter)
    label = f"{ref.parent.name if ref.name == 'adapter' and ref.parent.name else ref.name} ({', '.join(kinds)})"
    names = {t: class_names(meta, t, task.channels) for t, task in model.tasks.items() if task.kind == "classes"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    batch_size, workers = resolve(a, model)

    def write(item) -> None:  # one image's maps (and overview), then its line
        f, stem, size, picture, outs = item
        maps = maps_at(model, outs, size)
        written = []
        for t, arr in maps.items():
            dest = out / f"{stem}_{t}.png"
            write_map(dest, arr, description(kinds[t], names.get(t)))
            written.append(str(dest))
        if picture is not None:
            dest = out / f"{stem}_overview.png"
            write_overview(dest, overview(picture, maps, kinds, names, f"{f.name}: {label}"))
            written.append(str(dest))
        print(f"{f}: " + ", ".join(written))

    results = iter_outputs(model, list(map(Path, a.images)), a.max_side, not a.no_overview, batch_size, workers)
    if stream_results(results, write, prefix="skipped"):
        raise SystemExit(2)


if __name__ == "__main__":
    main()
