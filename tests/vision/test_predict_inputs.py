"""Issue 17 (vision.predict inputs): 16-bit pictures keep their gradient, large photos are reduced
while decoded (no full-size float copy), outputs never overwrite one another within a call and are
written atomically, and each image's line is flushed as soon as its maps are written."""
from __future__ import annotations

import io
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.cli import unique_stems
from vision import predict
from vision.images import read_picture


@pytest.fixture(scope="module")
def model():
    from vision.model import build_model
    from vision.tasks import make_task

    torch.manual_seed(0)
    m = build_model("tiny-swin", {"saliency": make_task("saliency"), "normals": make_task("normals")},
                    [{"name": "bitfit"}], {"img_size": 32}, decoder_width=8)
    m.image_size = 32
    return m.eval()


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    from vision.train import save_bundle

    path = tmp_path_factory.mktemp("vision_inputs") / "adapter"
    save_bundle(model, path, {"data": {"size": 32, "layout": "folder"}}, {"test": {}, "definition": {}})
    return path


def _picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth colour picture with some texture, drawn at 1/10 size and enlarged by PIL (a 4000 x 3000
    picture in a fraction of a second)."""
    sw, sh = max(4, w // 10), max(4, h // 10)
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.stack([255 * x / sw, 255 * y / sh, 127 + 100 * np.sin(x / 3.7 + seed) * np.cos(y / 2.3)], -1)
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    small = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    return small.resize((w, h), Image.NEAREST) if (sw, sh) != (w, h) else small


def _photo(path: Path, w: int, h: int, seed: int = 0, **save) -> Path:
    _picture(w, h, seed).save(path, **save)  # JPEG / PNG by the suffix
    return path


# ------------------------------------------------------------------------------------ bit depth

def test_16_bit_png_keeps_its_gradient_and_equals_the_8_bit_picture(model, tmp_path):
    g8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))  # 48 x 64 ramp
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # the same picture in 16 bits
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    a16, a8 = read_picture(tmp_path / "g16.png"), read_picture(tmp_path / "g8.png")
    assert len(np.unique(a16[..., 0])) == 64 and a16.max() == 252  # not all white (was 255 everywhere)
    np.testing.assert_allclose(a16, a8, atol=0.5)  # within 8-bit quantisation
    m16, m8 = predict.predict(model, tmp_path / "g16.png"), predict.predict(model, tmp_path / "g8.png")
    for t in m8:
        assert np.abs(m16[t].astype(int) - m8[t].astype(int)).max() <= 1, t


def test_real_16_bit_ct_slice_is_read_on_its_16_bit_scale(model, tmp_path):
    """A real 16-bit medical image (pydicom's CT_small.dcm, a 128 x 128 CT slice, values 128..2191) saved as a
    16-bit PNG: read on the 16-bit scale, its grey levels kept (the old reader saturated it to 255 everywhere)."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    ct = dcmread(get_testdata_file("CT_small.dcm")).pixel_array  # int16, all values >= 0 in this slice
    assert ct.min() >= 0 and ct.max() > 255
    Image.fromarray(ct.astype(np.uint16)).save(tmp_path / "ct16.png")
    assert Image.open(tmp_path / "ct16.png").mode == "I;16"
    got = read_picture(tmp_path / "ct16.png")
    np.testing.assert_allclose(got[..., 0], ct.astype(np.float32) * 255 / 65535, atol=1e-3)
    assert len(np.unique(got[..., 0])) == len(np.unique(ct)) and got.max() < 9
    maps = predict.predict(model, tmp_path / "ct16.png")
    assert maps["saliency"].shape == ct.shape and all(np.isfinite(m.astype(float)).all() for m in maps.values())


@pytest.mark.parametrize("mode, values, want", [
    ("I", np.arange(64, dtype=np.int32).reshape(8, 8) * 1000, np.arange(64).reshape(8, 8) * 1000 * 255 / 65535),
    ("F", np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), np.linspace(0, 255, 64).reshape(8, 8)),
    ("F", np.linspace(-5, 5, 64, dtype=np.float32).reshape(8, 8), np.linspace(0, 255, 64).reshape(8, 8)),
])
def test_32_bit_integer_and_float_pictures_are_scaled(tmp_path, mode, values, want):
    Image.fromarray(values, mode=mode).save(tmp_path / "x.tif")
    got = read_picture(tmp_path / "x.tif")
    assert got.shape == (8, 8, 3)
    np.testing.assert_allclose(got[..., 0], want, atol=1e-3)


# ------------------------------------------------------------------------------------ large photos

def _large(model, tmp_path, suffix: str, **save):
    """Predict a 4000 x 3000 photo with maps at most 512 px: the maps, the peak of traced (numpy)
    memory, and the maps of the same picture resized to 512 x 384 first."""
    im = _picture(4000, 3000)
    big = tmp_path / f"big{suffix}"
    im.save(big, **save)
    tracemalloc.start()
    try:
        maps = predict.predict(model, big, max_side=512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    im.resize((512, 384), Image.BILINEAR).save(tmp_path / "small.png")
    return maps, peak, predict.predict(model, tmp_path / "small.png", max_side=512)


FULL_FLOAT = 4000 * 3000 * 3 * 4  # bytes of a full-size float32 copy of a 4000 x 3000 picture


def _close(maps, ref):
    for t in maps:  # the same as resizing the picture first, within JPEG / filter differences
        diff = np.abs(maps[t].astype(int) - ref[t].astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 8, (t, diff.mean(), diff.max())


def test_large_jpeg_is_reduced_while_decoded(model, tmp_path):
    maps, peak, ref = _large(model, tmp_path, ".jpg", quality=92)
    assert peak < FULL_FLOAT / 8, f"peak {peak / 1e6:.1f} MB"  # was over 150 MB (two full-size copies)
    assert maps["saliency"].shape == (384, 512) and maps["normals"].shape == (384, 512, 3)
    _close(maps, ref)
    # --max-side 0 keeps the full resolution, and a larger limit never enlarges
    assert predict.predict(model, tmp_path / "small.png", max_side=0)["saliency"].shape == (384, 512)
    assert predict.predict(model, tmp_path / "small.png", max_side=4096)["saliency"].shape == (384, 512)
    assert predict.MAX_SIDE == 1024  # the command's default: a 4000 x 3000 photo gives 1024 x 768 maps


@pytest.mark.slow
def test_large_png_is_reduced_before_it_becomes_float(model, tmp_path):
    maps, peak, ref = _large(model, tmp_path, ".png", compress_level=1)
    assert peak < FULL_FLOAT / 8, f"peak {peak / 1e6:.1f} MB"
    _close(maps, ref)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown portrait
    _photo(tmp_path / "p.jpg", 64, 48, exif=exif.tobytes())
    assert read_picture(tmp_path / "p.jpg").shape == (64, 48, 3)


# ------------------------------------------------------------------------------------ output names

def test_unique_stems():
    assert unique_stems(["a/photo.jpg", "b/photo.png", "c.jpg"]) == ["a_photo", "b_photo", "c"]
    assert unique_stems(["x/a/p.jpg", "y/a/p.jpg"]) == ["x_a_p", "y_a_p"]
    d = unique_stems(["d.jpg", "d.jpg", "q/D.png"])  # case-insensitive: D.png would overwrite d's maps on macOS
    assert d[0].endswith("_d") and d[1] == d[0] + "-2" and d[2] == "q_D"
    assert unique_stems(["same.png", "same.png"]) == ["same", "same-2"]
    assert unique_stems(["a/x.png", "a_x.png"]) == ["x", "a_x"]


def test_same_stem_in_two_folders_writes_both(bundle, model, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = _photo(tmp_path / "a" / "photo.jpg", 40, 32, seed=1)
    two = _photo(tmp_path / "b" / "photo.png", 40, 32, seed=2)
    out = tmp_path / "out"
    predict.main(["--adapter", str(bundle), "--out", str(out), str(one), str(two)])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{one}: {out / 'a_photo_saliency.png'}, {out / 'a_photo_normals.png'}, {out / 'a_photo_overview.png'}",
                     f"{two}: {out / 'b_photo_saliency.png'}, {out / 'b_photo_normals.png'}, {out / 'b_photo_overview.png'}"]
    for stem, img in (("a_photo", one), ("b_photo", two)):
        want = predict.predict(model, img)
        assert np.array_equal(np.asarray(Image.open(out / f"{stem}_saliency.png")), want["saliency"])
    assert sorted(p.name for p in out.iterdir()) == ["a_photo_normals.png", "a_photo_overview.png", "a_photo_saliency.png",
                                                     "b_photo_normals.png", "b_photo_overview.png", "b_photo_saliency.png"]


def test_a_failed_write_leaves_the_previous_file_whole(bundle, tmp_path, monkeypatch, capsys):
    img = _photo(tmp_path / "x.png", 40, 32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x_saliency.png").write_bytes(b"the previous run's map")
    real_save = Image.Image.save

    def save(self, fp, *a, **kw):
        real_save(self, fp, *a, **kw)
        raise OSError("disk full")  # after writing: a direct write would have replaced the old file

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(OSError, match="disk full"):
        predict.main(["--adapter", str(bundle), "--out", str(out), str(img)])
    assert (out / "x_saliency.png").read_bytes() == b"the previous run's map"
    assert [p.name for p in out.iterdir()] == ["x_saliency.png"]  # no temporary file left


# ------------------------------------------------------------------------------------ streaming

def test_each_image_line_is_flushed_before_the_next_image(bundle, tmp_path, monkeypatch):
    """stdout to a file or pipe is block-buffered: the lines of images 1-2 must reach it before image
    3 is read (here it crashes; one image per batch, decoded here: the old path;
    tests/vision/test_predict_batches.py has the batched one)."""
    files = [_photo(tmp_path / f"{i}.png", 40, 32, seed=i) for i in range(3)]
    real = predict.read_image
    calls = []

    def flaky(path, *a, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(path, *a, **kw)

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8", write_through=False))
    monkeypatch.setattr(predict, "read_image", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        predict.main(["--adapter", str(bundle), "--out", str(tmp_path / "out"), "--batch-size", "1", "--workers", "0",
                      "--no-overview", *map(str, files)])
    lines = raw.getvalue().decode().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(files[0]), str(files[1])]
