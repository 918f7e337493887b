"""Issue 17 (medical.predict inputs): results streamed file by file, 16-bit images read with their
gradient, and a DICOM of another modality / body part than the bundle's training images warned about."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medical import predict
from medical.io import dicom_tags, read_image
from medical.transforms import preprocessing_dict, to_model_input
from shared import backbones, peft
from shared.heads import LinearHead

ROOT = Path(__file__).resolve().parents[2]
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "reg_tokens": 0}
CHEST = {"modality": "CR/DX", "body_part": "CHEST"}


@pytest.fixture(scope="module")
def chest_bundle(tmp_path_factory):
    """A tiny classifier whose bundle says it was trained on chest X-rays (preprocessing.input)."""
    tmp = tmp_path_factory.mktemp("med_inputs")
    bb = backbones.create("tiny-vit", **TINY)
    peft.attach(bb, [], backbone_id="tiny-vit")
    clf = peft.Classifier(bb, LinearHead(32, 2), labels=["normal", "pneumonia"])
    peft.save(clf, tmp / "bundle", preprocessing=preprocessing_dict(32, input=CHEST), backbone_id="tiny-vit",
              backbone_kwargs=TINY, extra={"task": "classification", "multilabel": False})
    return tmp / "bundle"


def _dicom(path: Path, modality: str, body_part: str | None, seed: int = 0) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    arr = np.random.default_rng(seed).integers(0, 4096, (32, 32)).astype(np.uint16)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _png(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------ modality check

def test_dicom_of_another_modality_or_body_part_is_warned_about(chest_bundle, tmp_path, capsys):
    ct = _dicom(tmp_path / "ct.dcm", "CT", "ABDOMEN")
    mr = _dicom(tmp_path / "mr.dcm", "MR", "HEAD", seed=1)
    cr = _dicom(tmp_path / "cr.dcm", "CR", "CHEST", seed=2)
    dx = _dicom(tmp_path / "dx.dcm", "DX", None, seed=3)  # no body part recorded: nothing to compare
    ct_chest = _dicom(tmp_path / "ctchest.dcm", "CT", "CHEST", seed=4)
    assert dicom_tags(ct) == {"Modality": "CT", "BodyPartExamined": "ABDOMEN"} and dicom_tags(dx) == {"Modality": "DX"}
    files = [ct, mr, cr, dx, ct_chest]
    assert predict.main(["--adapter", str(chest_bundle), *map(str, files)]) == 0  # warned, still predicted
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if not line.startswith(" ")] == list(map(str, files))
    warnings = err.strip().splitlines()
    assert len(warnings) == 3, err
    assert warnings[0].startswith(f"warning: {ct}: DICOM Modality CT, BodyPartExamined ABDOMEN, but this adapter "
                                  f"was trained on CR/DX CHEST images")
    assert warnings[1].startswith(f"warning: {mr}: DICOM Modality MR, BodyPartExamined HEAD,")
    assert warnings[2].startswith(f"warning: {ct_chest}: DICOM Modality CT, but")
    assert not any(str(cr) in w or str(dx) in w for w in warnings)


def test_no_warning_for_png_or_for_a_bundle_that_records_no_input(chest_bundle, tmp_path, capsys):
    png = _png(tmp_path / "x.png")
    assert predict.main(["--adapter", str(chest_bundle), str(png)]) == 0
    assert capsys.readouterr().err == ""
    assert predict.input_warning({"preprocessing": preprocessing_dict(32)}, str(_dicom(tmp_path / "ct.dcm", "CT", "HEAD"))) is None
    # a top-level "input" field counts as well
    assert "Modality CT" in predict.input_warning({"input": {"modality": "MR"}}, str(tmp_path / "ct.dcm"))


def test_data_modules_record_what_their_images_are(tmp_path, med):
    from medical.data import ImageFolderDataModule, MedMNISTDataModule

    npz = med.write_medmnist(tmp_path / "pneumoniamnist.npz")
    dm = MedMNISTDataModule(root=str(npz), img_size=32)
    assert dm.preprocessing["input"] == {"modality": "CR/DX", "body_part": "CHEST"}
    organ = med.write_medmnist(tmp_path / "organamnist.npz", n_classes=11)
    assert MedMNISTDataModule(root=str(organ), img_size=32).preprocessing["input"] == {"modality": "CT", "body_part": "ABDOMEN"}
    folder = med.write_imagefolder(tmp_path / "folder", per_class=6)
    assert "input" not in ImageFolderDataModule(root=str(folder), img_size=32).preprocessing  # unknown: nothing claimed
    given = ImageFolderDataModule(root=str(folder), img_size=32, imaging={"modality": "ct", "body_part": "chest"})
    assert given.preprocessing["input"] == {"modality": "CT", "body_part": "CHEST"}
    with pytest.raises(ValueError, match="imaging: .*expected a mapping with modality"):
        ImageFolderDataModule(root=str(folder), img_size=32, imaging={"modalty": "CT"})


def test_catalogue_pneumonia_bundle_records_chest_xray_and_keeps_its_tensors():
    from shared.artifacts import sha256_file

    folder = ROOT / "adapters" / "pneumonia-dinov2s-lora"
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["preprocessing"]["input"] == CHEST
    assert sha256_file(folder / "adapter.safetensors") == meta["sha256"]  # the tensors were not touched


# ------------------------------------------------------------------------------ streaming

def test_results_are_printed_as_each_file_is_done(chest_bundle, tmp_path, capsys, monkeypatch):
    """A crash on file 4 (an unexpected error) keeps what files 1-3 printed: file 1's result and
    file 2's error were out before file 3 was read (one file per batch, decoded here: the old path;
    tests/medical/test_predict_batches.py has the batched one)."""
    files = [_png(tmp_path / "a.png"), tmp_path / "missing.png", _png(tmp_path / "c.png", 1), _png(tmp_path / "d.png", 2)]
    real_read = predict._read
    seen = []

    def read(f):
        seen.append(f)
        if len(seen) == 3:  # file 3: what was printed so far is already on the streams
            so_far = capsys.readouterr()
            assert so_far.out.splitlines()[0] == str(files[0]) and "missing.png: file not found" in so_far.err
            print(so_far.out, end="")
        if len(seen) == 4:
            raise RuntimeError("disk on fire")
        return real_read(f)

    monkeypatch.setattr(predict, "_read", read)
    with pytest.raises(RuntimeError, match="disk on fire"):
        predict.main(["--adapter", str(chest_bundle), "--batch-size", "1", "--workers", "0", *map(str, files)])
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if not line.startswith(" ")] == [str(files[0]), str(files[2])]


# ------------------------------------------------------------------------------ bit depth

def test_16_bit_png_keeps_its_gradient_and_matches_the_8_bit_picture(tmp_path):
    from PIL import Image

    g8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64 x 64 horizontal ramp
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # the same picture, 16 bits
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    a16, a8 = read_image(tmp_path / "g16.png"), read_image(tmp_path / "g8.png")
    assert len(np.unique(a16)) == 64  # the gradient is there, not clipped to one value
    x16, x8 = to_model_input(a16, 32), to_model_input(a8, 32)  # the model input (min-max scaled)
    assert float(x16.std()) > 0.5
    torch.testing.assert_close(x16, x8, atol=1e-5, rtol=0)


def test_masks_of_two_inputs_with_one_name_do_not_overwrite_each_other(tmp_path, capsys):
    from medical.segmentation import LinearDecoder, save_segmenter

    bb = backbones.create("tiny-vit", **TINY)
    peft.attach(bb, [], backbone_id="tiny-vit")
    dec = LinearDecoder(32, 2).eval()
    torch.nn.init.normal_(dec.classifier.weight, std=1.0)
    save_segmenter(bb, dec, tmp_path / "seg", labels=["background", "lung"], preprocessing=preprocessing_dict(32),
                   backbone_id="tiny-vit", backbone_kwargs=TINY)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = _png(tmp_path / "a" / "case.png"), _png(tmp_path / "b" / "case.png", seed=1)
    out = tmp_path / "masks"
    assert predict.main(["--adapter", str(tmp_path / "seg"), "--out", str(out), str(one), str(two)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"mask written to {out / 'a_case_mask.png'}",
                                                    f"mask written to {out / 'b_case_mask.png'}"]
    assert sorted(p.name for p in out.iterdir()) == ["a_case_mask.png", "b_case_mask.png"]
