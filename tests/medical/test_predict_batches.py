"""Issue 22 item 2 (medical.predict in batches): batched classification and segmentation equal the
file-by-file results (images of several sizes and bit depths, DICOM with its modality warning), a
bad file is named and skipped while the rest of its batch is predicted, volumes are predicted one
at a time (their slices are the batch), and every mask has its own input's size."""
from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from medical import predict
from medical.io import ImageReadError
from medical.transforms import preprocessing_dict
from shared import backbones, peft
from shared.heads import LinearHead

from .test_predict_inputs import TINY, _dicom, _png, chest_bundle  # noqa: F401  (the tiny chest classifier fixture)


def _images(tmp_path) -> list:
    """2D inputs of several sizes and kinds: 8-bit PNGs, a 16-bit PNG, an RGB JPEG, a DICOM."""
    rng = np.random.default_rng(3)
    files = [_png(tmp_path / "a.png")]
    Image.fromarray(rng.integers(0, 255, (50, 40), dtype=np.uint8)).save(tmp_path / "tall.png")
    Image.fromarray((rng.integers(0, 65535, (24, 70))).astype(np.uint16)).save(tmp_path / "wide16.png")
    Image.fromarray(rng.integers(0, 255, (33, 45, 3), dtype=np.uint8)).save(tmp_path / "rgb.jpg")
    files += [tmp_path / "tall.png", tmp_path / "wide16.png", tmp_path / "rgb.jpg", _dicom(tmp_path / "ct.dcm", "CT", "ABDOMEN")]
    files.append(_png(tmp_path / "b.png", seed=5))
    return [str(f) for f in files]


def test_batched_classification_equals_one_at_a_time(chest_bundle, tmp_path):  # noqa: F811
    files = _images(tmp_path)
    warned = []
    one = list(predict.iter_classify(chest_bundle, files, top_k=2, warn=warned.append, batch_size=1, workers=0))
    batched = list(predict.iter_classify(chest_bundle, files, top_k=2, warn=warned.append, batch_size=4, workers=1))
    assert [f for f, _ in one] == [f for f, _ in batched] == files
    for (_, a), (_, b) in zip(one, batched):
        assert [lab for lab, _ in a] == [lab for lab, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-5, rtol=0)
    assert len({round(a[0][1], 5) for _, a in one}) > 1
    assert len(warned) == 2 and all("ct.dcm: DICOM Modality CT" in w for w in warned)  # once per run, as it is read


def test_a_bad_file_is_named_and_the_rest_of_its_batch_predicted(chest_bundle, tmp_path, capsys):  # noqa: F811
    files = _images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = [files[0], str(tmp_path / "broken.png"), files[1], str(tmp_path / "missing.dcm"), *files[2:]]
    assert predict.main(["--adapter", str(chest_bundle), "--batch-size", "3", "--workers", "1", *args]) == 2
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if not line.startswith(" ")] == files
    errs = [line for line in err.splitlines() if line.startswith("error:")]
    assert errs[0].startswith(f"error: {tmp_path / 'broken.png'}: ") and errs[1].startswith(f"error: {tmp_path / 'missing.dcm'}:")
    assert len(errs) == 2
    assert predict.main(["--adapter", str(chest_bundle), "--batch-size", "1", "--workers", "0", *args]) == 2
    assert capsys.readouterr().out == out


@pytest.fixture(scope="module")
def volume_bundle(tmp_path_factory):
    """A tiny classifier of .npy volumes (slices along axis 0, mean over slice features)."""
    tmp = tmp_path_factory.mktemp("med_volumes")
    torch.manual_seed(1)
    bb = backbones.create("tiny-vit", **TINY)
    peft.attach(bb, [], backbone_id="tiny-vit")
    clf = peft.Classifier(bb, LinearHead(32, 2, pool="mean"), labels=["no", "yes"])
    peft.save(clf, tmp / "bundle", preprocessing=preprocessing_dict(32, volume_axis=0), backbone_id="tiny-vit",
              backbone_kwargs=TINY, extra={"task": "classification", "multilabel": False})
    return tmp / "bundle"


def test_volumes_are_classified_one_at_a_time(volume_bundle, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    files = []
    for i, depth in enumerate((3, 6, 4)):
        files.append(str(tmp_path / f"v{i}.npy"))
        np.save(files[-1], rng.random((depth, 28, 30)).astype(np.float32))
    png = str(_png(tmp_path / "slice.png"))
    forwards = []
    real = predict.stacked
    monkeypatch.setattr(predict, "stacked", lambda xs, f: forwards.append([tuple(x.shape) for x in xs]) or real(xs, f))
    batched = list(predict.iter_classify(volume_bundle, [files[0], png, *files[1:]], batch_size=8, workers=0))
    err = batched.pop(1)  # v0 is predicted as soon as it is read (alone), then the PNG is refused
    assert isinstance(err, ImageReadError) and f"{png}: a 2D image, but this bundle classifies 3D volumes" in str(err)
    assert forwards == [[(3, 3, 32, 32)], [(6, 3, 32, 32)], [(4, 3, 32, 32)]]  # one volume per forward
    one = list(predict.iter_classify(volume_bundle, files, batch_size=1, workers=0))
    for (fa, a), (fb, b) in zip(one, batched):
        assert fa == fb
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def seg_bundle(tmp_path_factory):
    from medical.segmentation import LinearDecoder, save_segmenter

    tmp = tmp_path_factory.mktemp("med_seg")
    torch.manual_seed(0)
    bb = backbones.create("tiny-vit", **TINY)
    peft.attach(bb, [], backbone_id="tiny-vit")
    dec = LinearDecoder(32, 3).eval()
    torch.nn.init.normal_(dec.classifier.weight, std=1.0)
    return save_segmenter(bb, dec, tmp / "seg", labels=["background", "lung", "heart"],
                          preprocessing=preprocessing_dict(32, volume_axis=0), backbone_id="tiny-vit",
                          backbone_kwargs=TINY)


def test_batched_masks_equal_one_at_a_time_at_each_inputs_size(seg_bundle, tmp_path, capsys):
    import nibabel as nib

    files = _images(tmp_path)
    vol = tmp_path / "vol.nii.gz"
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((20, 18, 5)).astype(np.float32), affine), str(vol))
    files.insert(2, str(vol))
    masks = {}
    for batch, workers in (("1", "0"), ("4", "1")):
        out = tmp_path / f"masks{batch}"
        assert predict.main(["--adapter", str(seg_bundle), "--out", str(out), "--batch-size", batch,
                             "--workers", workers, *files]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == len(files) and all(line.startswith(f"mask written to {out}") for line in lines)
        masks[batch] = {p.name: (np.asarray(Image.open(p)) if p.suffix == ".png" else nib.load(str(p)).get_fdata())
                        for p in sorted(out.iterdir())}
    assert list(masks["1"]) == list(masks["4"])
    for name, a in masks["1"].items():
        b = masks["4"][name]
        assert a.shape == b.shape
        assert (a != b).mean() < 0.01, name  # argmax of equal logits (to float tolerance)
    assert masks["1"]["tall_mask.png"].shape == (50, 40) and masks["1"]["wide16_mask.png"].shape == (24, 70)
    assert masks["1"]["vol_mask.nii.gz"].shape == (20, 18, 5)  # the volume's own shape (sliced along its last axis)
    np.testing.assert_allclose(nib.load(str(tmp_path / "masks4" / "vol_mask.nii.gz")).affine, affine)
    assert len(np.unique(masks["1"]["tall_mask.png"])) > 1


def test_the_loaders_can_be_sent_to_spawned_workers(chest_bundle):  # noqa: F811
    meta = peft.read_meta(chest_bundle)
    for fn, item in ((predict.load_for_classify, "nope.png"), (predict.load_for_segment, ("nope.png", "nope"))):
        load = pickle.loads(pickle.dumps(functools.partial(fn, meta=meta)))
        with pytest.raises(ImageReadError, match="nope.png"):
            load(item)
