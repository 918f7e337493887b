"""medical.io readers and medical.transforms: formats, values, shapes and every bad input."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from medical.io import ImageReadError, check_same_shape, read_image, read_mask
from medical.transforms import (IMAGENET_MEAN, IMAGENET_STD, augmentation, finish, mask_to_size, preprocessing_dict,
                                scale_intensity, to_model_input, volume_to_slices)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


# --------------------------------------------------------------------------- readers


def test_png_grey_rgb_rgba_16bit(tmp_path, med):
    g = med.pattern()
    out = read_image(med.write_png(tmp_path / "g.png", g))
    assert out.dtype == np.float32 and out.shape == (32, 32)
    np.testing.assert_array_equal(out, g)

    rgb = np.stack([g, 255 - g, g // 2], -1)
    np.testing.assert_array_equal(read_image(med.write_png(tmp_path / "rgb.png", rgb)), rgb)
    rgba = np.concatenate([rgb, np.full((32, 32, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(read_image(med.write_png(tmp_path / "rgba.png", rgba)), rgb)

    deep = med.pattern(hi=4095, dtype=np.uint16)
    np.testing.assert_array_equal(read_image(med.write_png(tmp_path / "deep.png", deep)), deep)


def test_jpeg(tmp_path, med):
    from PIL import Image

    Image.fromarray(med.pattern()).save(tmp_path / "a.jpg")
    Image.fromarray(np.stack([med.pattern()] * 3, -1)).save(tmp_path / "b.jpeg")
    assert read_image(tmp_path / "a.jpg").shape == (32, 32)
    assert read_image(tmp_path / "b.jpeg").shape == (32, 32, 3)


def test_dicom_rescale_and_monochrome1(tmp_path, med):
    raw = med.pattern(hi=3000, dtype=np.uint16)
    out = read_image(med.write_dicom(tmp_path / "ct.dcm", raw, slope=2.0, intercept=-1024.0))
    assert out.dtype == np.float32 and out.shape == (32, 32)
    np.testing.assert_allclose(out, raw * 2.0 - 1024.0)

    inv = read_image(med.write_dicom(tmp_path / "cr.dcm", raw, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inv, raw.max() + raw.min() - raw.astype(np.float64))
    # DICOM without extension (a PACS export) is read too
    (tmp_path / "IM0001").write_bytes((tmp_path / "ct.dcm").read_bytes())
    np.testing.assert_allclose(read_image(tmp_path / "IM0001"), out)


def test_dicom_bundled_ct_small():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom test data not available offline")
    ds = pydicom.dcmread(path)
    out = read_image(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(out, expected)


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_nifti_2d_3d_4d(tmp_path, name, med):
    for shape in [(32, 32), (16, 16, 4), (16, 16, 4, 2)]:
        a = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        out = read_image(med.write_nifti(tmp_path / f"{len(shape)}{name}", a))
        assert out.shape == shape and out.dtype == np.float32
        np.testing.assert_allclose(out, a, rtol=1e-6)


def test_npy(tmp_path):
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    np.save(tmp_path / "a.npy", a)
    out = read_image(tmp_path / "a.npy")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a)


def _corrupt_files(tmp_path, med):
    rnd = np.random.default_rng(0).bytes(2000)
    good_png = med.write_png(tmp_path / "ok.png", med.pattern(shape=(64, 64)))
    noise = np.random.default_rng(1).normal(size=(16, 16, 8)).astype(np.float32)  # incompressible
    good_nii = med.write_nifti(tmp_path / "ok.nii", noise)
    files = {}
    for name in ("rand.png", "rand.jpg", "rand.dcm", "rand.nii.gz", "rand.nii", "rand.npy"):
        (tmp_path / name).write_bytes(rnd)
        files[name] = "cannot read"
    (tmp_path / "trunc.png").write_bytes(good_png.read_bytes()[: len(good_png.read_bytes()) // 2])
    files["trunc.png"] = "cannot read"
    (tmp_path / "trunc.nii").write_bytes(good_nii.read_bytes()[:600])
    files["trunc.nii"] = "cannot read"
    (tmp_path / "trunc.nii.gz").write_bytes(gzip.compress(good_nii.read_bytes())[:4000])
    files["trunc.nii.gz"] = "cannot read"
    dcm = med.write_dicom(tmp_path / "full.dcm", med.pattern(dtype=np.uint16))
    (tmp_path / "trunc.dcm").write_bytes(dcm.read_bytes()[:-700])
    files["trunc.dcm"] = "cannot read"
    med.write_dicom(tmp_path / "nopix.dcm", med.pattern(dtype=np.uint16), pixels=False)
    files["nopix.dcm"] = "no pixel data"
    np.save(tmp_path / "empty.npy", np.zeros((0, 32), np.float32))
    files["empty.npy"] = "empty image"
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan], [np.inf, 0.0]]))
    files["nan.npy"] = "2 non-finite"
    med.write_nifti(tmp_path / "nan.nii.gz", np.full((4, 4, 2), np.nan, np.float32))
    files["nan.nii.gz"] = "non-finite"
    (tmp_path / "notes.txt").write_text("hello")
    files["notes.txt"] = "unsupported file type"
    files["missing.png"] = "file not found"
    return files


def test_every_bad_file_names_itself_and_the_reason(tmp_path, med):
    for name, reason in _corrupt_files(tmp_path, med).items():
        with pytest.raises(ImageReadError) as e:
            read_image(tmp_path / name)
        assert str(tmp_path / name) in str(e.value), name
        assert reason in str(e.value), (name, str(e.value))
    assert issubclass(ImageReadError, ValueError)


def test_read_mask_formats(tmp_path, med):
    from PIL import Image

    m = np.zeros((32, 32), np.uint8)
    m[4:20, 4:20] = 255
    out = read_mask(med.write_png(tmp_path / "m.png", m))
    assert out.dtype == np.int64 and set(np.unique(out)) == {0, 255}

    pal = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (8, 2)), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    pal.save(tmp_path / "pal.png")
    assert set(np.unique(read_mask(tmp_path / "pal.png"))) == {0, 1, 2, 3}

    lab = np.zeros((8, 8, 3), np.float32)
    lab[2:4, 2:4, 1] = 2.0
    out = read_mask(med.write_nifti(tmp_path / "l.nii.gz", lab))
    assert out.dtype == np.int64 and out.shape == (8, 8, 3) and out.max() == 2

    with pytest.raises(ImageReadError, match="non-integer"):
        read_mask(med.write_nifti(tmp_path / "frac.nii.gz", lab + 0.5))
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 255
    with pytest.raises(ImageReadError, match="colour mask"):
        read_mask(med.write_png(tmp_path / "colour.png", colour))
    with pytest.raises(ImageReadError, match="file not found"):
        read_mask(tmp_path / "nope.png")


def test_check_same_shape(tmp_path):
    check_same_shape(np.zeros((4, 5)), np.zeros((4, 5)), "a", "b")
    check_same_shape(np.zeros((4, 5, 3)), np.zeros((4, 5)), "a", "b")  # RGB image
    check_same_shape(np.zeros((4, 5, 6, 2)), np.zeros((4, 5, 6)), "a", "b")  # multi-modal volume
    with pytest.raises(ImageReadError) as e:
        check_same_shape(np.zeros((4, 5)), np.zeros((5, 4)), tmp_path / "img.png", tmp_path / "mask.png")
    assert "img.png" in str(e.value) and "mask.png" in str(e.value)


# --------------------------------------------------------------------------- transforms


def test_to_model_input_grey_minmax_and_replication(med):
    img = med.pattern(shape=(40, 30)).astype(np.float32) * 3 + 100  # arbitrary range
    x = to_model_input(img, size=28)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    u = unnormalise(x)
    assert torch.allclose(u[0], u[1], atol=1e-5) and torch.allclose(u[0], u[2], atol=1e-5)
    assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5
    # no resize: min -> 0 and max -> 1 exactly
    u = unnormalise(to_model_input(med.pattern(), size=32))
    assert abs(u.min().item()) < 1e-5 and abs(u.max().item() - 1) < 1e-5


def test_to_model_input_rgb_keeps_colour_and_constant_image(med):
    g = med.pattern().astype(np.float32)
    rgb = np.stack([g, np.zeros_like(g), np.full_like(g, 255)], -1)
    u = unnormalise(to_model_input(rgb, size=32))
    assert torch.allclose(u[1], torch.zeros(32, 32), atol=1e-5) and torch.allclose(u[2], torch.ones(32, 32), atol=1e-5)
    const = to_model_input(np.full((10, 10), 7.0), size=16)
    assert torch.allclose(unnormalise(const), torch.zeros(3, 16, 16), atol=1e-5)
    with pytest.raises(ValueError, match="channels-last"):
        to_model_input(np.zeros((3, 32, 32)), size=16)


def test_intensity_percentile_and_window():
    img = np.zeros((100, 100), np.float32)
    img[:, 50:] = 100.0
    img[0, 0] = 1e6  # one hot pixel
    pm = scale_intensity(img, "percentile")
    assert pm[50, 75] == 1.0 and pm[50, 25] == 0.0  # the hot pixel does not squash the image
    mm = scale_intensity(img, "minmax")
    assert mm[50, 75] < 1e-3
    w = scale_intensity(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), (-160, 240))
    np.testing.assert_allclose(w.numpy(), [0, 0, 0.5, 1, 1])
    with pytest.raises(ValueError):
        scale_intensity(img, "zscore")


def test_mask_to_size_nearest():
    m = np.zeros((64, 64), np.int64)
    m[16:48, 16:48] = 2
    out = mask_to_size(m, 32)
    assert out.dtype == torch.int64 and out.shape == (32, 32)
    assert set(out.unique().tolist()) == {0, 2} and (out == 2).sum() == 16 * 16
    assert mask_to_size(np.stack([m, m]), 16).shape == (2, 16, 16)


def test_volume_to_slices_whole_volume_scaling():
    vol = np.stack([np.full((20, 20), v, np.float32) for v in (0.0, 50.0, 100.0)])
    vol[1, 0, 0] = 60.0
    x = volume_to_slices(vol, size=16)
    assert x.shape == (3, 3, 16, 16)
    u = unnormalise(x)
    assert torch.allclose(u[0], torch.zeros(3, 16, 16), atol=1e-5)
    assert torch.allclose(u[2], torch.ones(3, 16, 16), atol=1e-5)
    assert abs(u[1, 0, 8, 8].item() - 0.5) < 1e-5  # middle slice keeps its relative brightness
    assert volume_to_slices(np.zeros((4, 5, 6)), 8, axis=-1).shape == (6, 3, 8, 8)


def test_augmentation_is_seeded_and_keeps_mask_aligned():
    img = torch.zeros(1, 32, 32)
    img[:, 4:12, 2:10] = 1.0
    mask = (img[0] > 0.5).long()
    outs = []
    for _ in range(2):
        aug = augmentation(segmentation=True, seed=3)
        outs.append([finish(img, 32, aug, mask=mask) for _ in range(6)])
    for (x1, m1), (x2, m2) in zip(*outs):
        assert torch.equal(x1, x2) and torch.equal(m1, m2)
    changed = 0
    for x, m in outs[0]:
        u = unnormalise(x)[0]
        assert m.dtype == torch.int64 and set(m.unique().tolist()) <= {0, 1}
        # where the mask says foreground the image is bright, and vice versa (allowing edge pixels)
        agree = ((u > 0.5).long() == m).float().mean()
        assert agree > 0.95
        changed += int(not torch.equal(m, mask))
    assert changed > 0


def test_preprocessing_dict_is_json():
    d = preprocessing_dict(224)
    assert d["size"] == 224 and d["mean"] == list(IMAGENET_MEAN) and d["std"] == list(IMAGENET_STD)
    assert json.loads(json.dumps(preprocessing_dict(64, [-160, 240], slice_axis=-1)))["intensity"] == [-160.0, 240.0]
    assert preprocessing_dict(32, "percentile")["percentiles"] == [0.5, 99.5]


def test_percentile_on_a_large_volume_is_subsampled_but_close():
    vol = torch.linspace(0, 1, 5_000_000).reshape(50, 100, 1000)
    out = scale_intensity(vol, "percentile")
    assert out.shape == vol.shape and out.min() == 0 and out.max() == 1
    mid = out.flatten()[2_500_000].item()
    assert abs(mid - 0.5) < 1e-3
