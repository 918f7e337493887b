"""Issue 8 (medical as a newcomer meets it) + 7.9 (probe device): predict's domain checks, bad files,
masks at the input's resolution, the probe's bundle, demo folders, DINOv2 seeded / offline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medical import predict
from medical.transforms import preprocessing_dict
from shared import backbones, peft
from shared.heads import LinearHead

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "domains" / "medical"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 4, "reg_tokens": 4}
TINY_FLAG = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 4, num_heads: 4, reg_tokens: 4}"


@pytest.fixture(autouse=True)
def _no_stage_env(monkeypatch):
    monkeypatch.delenv("PEFT_SUITE_STAGE_DIR", raising=False)


def _png(path: Path, h: int, w: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def cls_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("med_cls")
    bb = backbones.create("tiny-vit", **TINY)
    peft.attach(bb, [peft.LoRA(r=2, targets=["qkv"])], backbone_id="tiny-vit")
    clf = peft.Classifier(bb, LinearHead(32, 3), labels=["a", "b", "c"])
    torch.nn.init.normal_(clf.head.fc.weight, std=1.0)
    peft.save(clf, tmp / "bundle", preprocessing=preprocessing_dict(32), backbone_id="tiny-vit", backbone_kwargs=TINY,
              extra={"task": "classification", "multilabel": False})
    return tmp / "bundle"


@pytest.fixture(scope="module")
def seg_bundle(tmp_path_factory):
    from medical.segmentation import LinearDecoder, save_segmenter

    tmp = tmp_path_factory.mktemp("med_seg")
    bb = backbones.create("tiny-vit", **TINY)
    peft.attach(bb, [], backbone_id="tiny-vit")
    dec = LinearDecoder(32, 2).eval()
    torch.nn.init.normal_(dec.classifier.weight, std=1.0)
    save_segmenter(bb, dec, tmp / "seg", labels=["background", "lung"], preprocessing=preprocessing_dict(32),
                   backbone_id="tiny-vit", backbone_kwargs=TINY)
    return tmp / "seg"


# --------------------------------------------------------------------------- predict

def test_audio_bundle_given_to_medical_predict_is_one_line(tmp_path, capsys):
    from audio.features import FbankConfig

    kw = {"max_length": 100, "num_mel_bins": 128, "hidden_size": 32, "layers": 2, "heads": 4}
    bb = backbones.create("tiny-ast", **kw)
    peft.attach(bb, [], backbone_id="tiny-ast")
    peft.save(peft.Classifier(bb, LinearHead(32, 2, pool="mean"), labels=["x", "y"]), tmp_path / "audio",
              preprocessing=FbankConfig(target_frames=100).to_dict(), backbone_id="tiny-ast", backbone_kwargs=kw,
              extra={"task": "classification"})
    img = _png(tmp_path / "x.png", 32, 32)
    assert predict.main(["--adapter", str(tmp_path / "audio"), str(img)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1  # was a 76-line conv2d traceback
    assert "an audio bundle (frontend 'fbank_ast'" in err and "python -m audio.predict" in err
    # a bundle with no medical preprocessing at all
    bb2 = backbones.create("tiny-vit", **TINY)
    peft.attach(bb2, [], backbone_id="tiny-vit")
    peft.save(peft.Classifier(bb2, LinearHead(32, 2)), tmp_path / "bare", backbone_id="tiny-vit", backbone_kwargs=TINY)
    assert predict.main(["--adapter", str(tmp_path / "bare"), str(img)]) == 2
    assert "preprocessing.pipeline is None" in capsys.readouterr().err


def test_one_bad_file_among_good_ones(cls_bundle, tmp_path, capsys):
    good1, good2 = _png(tmp_path / "g1.png", 32, 32), _png(tmp_path / "g2.png", 40, 36, seed=1)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    folder = tmp_path / "scans"
    folder.mkdir()
    rc = predict.main(["--adapter", str(cls_bundle), "--top-k", "3", str(good1), str(bad), str(folder), str(good2)])
    out, err = capsys.readouterr()
    assert rc == 2
    files = [line for line in out.splitlines() if not line.startswith(" ")]
    assert files == [str(good1), str(good2)]
    errs = err.strip().splitlines()
    assert len(errs) == 2 and str(bad) in errs[0] and errs[1] == f"error: {folder}: is a folder, not an image file " \
                                                                  f"(give the image files inside it)"
    assert predict.main(["--adapter", str(cls_bundle), "--top-k", "3", str(good1), str(good2)]) == 0
    assert capsys.readouterr().out == out  # the good files' predictions do not depend on the bad ones


def test_predict_help_documents_every_argument(capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m medical.predict")
    for action in predict.parser()._actions:
        assert action.help, action.dest
    for arg in ("--adapter BUNDLE", "--top-k K", "--out FOLDER", "FILE", "exit codes", "INPUT's resolution"):
        assert arg in text


def test_masks_are_written_at_the_inputs_resolution(seg_bundle, tmp_path, capsys):
    import nibabel as nib
    from PIL import Image

    from medical.segmentation import load_segmenter, predict_volume
    from medical.transforms import mask_to_size, to_model_input

    img = _png(tmp_path / "ct.png", 128, 96)  # (H, W) = (128, 96); the model runs at 32 x 32
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    vol = np.random.default_rng(0).random((40, 48, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "vol.nii.gz"))
    assert predict.main(["--adapter", str(seg_bundle), "--out", str(tmp_path / "pred"), str(img),
                         str(tmp_path / "vol.nii.gz")]) == 0
    mask = np.asarray(Image.open(tmp_path / "pred" / "ct_mask.png"))
    assert mask.shape == (128, 96) and set(np.unique(mask)) <= {0, 255}
    # at the model's resolution it agrees with the segmenter's own prediction (up to boundary pixels)
    backbone, decoder, _ = load_segmenter(seg_bundle)
    from medical.io import read_image

    low = predict_volume(backbone, decoder, to_model_input(read_image(img), 32)[None])[0]
    back = mask_to_size(torch.as_tensor(mask // 255), 32)
    assert (back == low).float().mean() > 0.8 and 0 < low.float().mean() < 1
    out = nib.load(str(tmp_path / "pred" / "vol_mask.nii.gz"))
    assert out.shape == (40, 48, 5) and np.allclose(out.affine, affine)
    assert "mask written to" in capsys.readouterr().out


# --------------------------------------------------------------------------- the probe's bundle

@pytest.mark.parametrize("feature", ["cls_1", "cls_1+patch_mean", "cls_4", "cls_4+patch_mean"])
def test_probe_bundle_reproduces_the_chosen_head(feature, tmp_path):
    from medical.backbone import probe_features
    from medical.probe import save_probe_bundle
    from medical.probes import variants

    model = backbones.create("tiny-vit", **TINY).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = variants(probe_features(model, x, 4), 4)[feature]
    head = torch.nn.Linear(feats.shape[1], 3)
    with torch.no_grad():
        want = head(feats)
    path = save_probe_bundle(model, head, feature, 4, tmp_path / "b", backbone="tiny-vit", backbone_kwargs=TINY,
                             labels=["a", "b", "c"], preprocessing=preprocessing_dict(32), multilabel=False,
                             metrics={"test/acc": 0.5})
    clf, logits_of = predict.load_classifier(path)
    with torch.no_grad():
        assert torch.allclose(logits_of(x), want, atol=1e-5)
        if feature.startswith("cls_1"):  # standard heads: the Classifier's own forward gives the same logits
            assert torch.allclose(clf(x), want, atol=1e-5)


def test_probe_saves_a_bundle_that_predict_accepts(tmp_path, capsys):
    from medical import probe
    from medical.synthetic import write_image_folder

    images = write_image_folder(tmp_path / "images", per_class={"train": 8, "val": 4, "test": 4}, size=32)
    rows = probe.run(["--config", str(RECIPES / "probe_demo.yaml"), "--data.root", str(images), "--data.img_size", "32",
                      "--backbone_kwargs", TINY_FLAG, "--ks", "[3]", "--epochs", "3", "--cache_dir", str(tmp_path / "c"),
                      "--output_dir", str(tmp_path / "probe")])
    bundle = tmp_path / "probe" / "linear" / "adapter"
    assert f"chosen linear probe saved as a bundle: {bundle}" in capsys.readouterr().out
    meta = peft.read_meta(bundle)
    assert meta["probe"]["feature"] == rows["linear"]["feature"] and meta["labels"] == sorted(
        d.name for d in (images / "train").iterdir())
    tests = sorted((images / "test").glob("*/*.png"))
    results = predict.classify_files(bundle, [str(p) for p in tests], top_k=1)
    acc = np.mean([top[0][0] == Path(f).parent.name for f, top in results])
    assert acc == pytest.approx(rows["linear"]["test/acc"], abs=1e-6)  # predict reproduces the probe's test score
    assert predict.main(["--adapter", str(bundle), str(tests[0])]) == 0


def test_probe_device_selection(monkeypatch):
    from medical.probe import select_device

    assert select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        select_device("gpu")
    with pytest.raises(ValueError, match="must be auto, cpu"):
        select_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda") == select_device("gpu")
    assert select_device("cpu") == torch.device("cpu")


def test_probe_moves_the_backbone_to_the_selected_device(monkeypatch, tmp_path):
    """run() extracts features on the device select_device returns (recorded through the model's .to)."""
    from medical import probe
    from medical.synthetic import write_image_folder

    images = write_image_folder(tmp_path / "images", per_class={"train": 4, "val": 2, "test": 2}, size=32)
    moved = []
    real_to = torch.nn.Module.to

    def spy(self, *a, **k):
        if isinstance(self, torch.nn.Module) and a and isinstance(a[0], torch.device):
            moved.append(a[0])
        return real_to(self, *a, **k)

    monkeypatch.setattr(probe, "select_device", lambda accelerator: torch.device("cpu") if accelerator == "cpu"
                        else torch.device("meta"))
    monkeypatch.setattr(torch.nn.Module, "to", spy)
    probe.run(["--config", str(RECIPES / "probe_demo.yaml"), "--data.root", str(images), "--data.img_size", "32",
               "--backbone_kwargs", TINY_FLAG, "--ks", "[3]", "--epochs", "1", "--cache_dir", str(tmp_path / "c"),
               "--output_dir", str(tmp_path / "p"), "--accelerator", "cpu"])
    assert moved == [torch.device("cpu")]


# --------------------------------------------------------------------------- demo folders

@pytest.mark.parametrize("entry", ["train", "probe", "segment"])
def test_demos_refuse_a_folder_they_did_not_write(entry, tmp_path):
    import importlib

    mine = tmp_path / "my_scans"
    mine.mkdir()
    (mine / "patient1.dcm").write_bytes(b"DICM")
    mod = importlib.import_module(f"medical.{entry}")
    with pytest.raises(ValueError, match=r"my_scans: this folder holds files the demo did not write.*--config"):
        mod.main(["--data.root", str(mine)])
    assert [p.name for p in mine.iterdir()] == ["patient1.dcm"]


# --------------------------------------------------------------------------- DINOv2

def test_dinov2_without_pretrained_weights_is_seeded_and_rebuilt_by_from_bundle(tmp_path):
    kw = {"size": "s", "img_size": 28, "pretrained": False}
    a, b = backbones.create("dinov2", **kw), backbones.create("dinov2", **kw)
    assert peft.fingerprint(a) == peft.fingerprint(b)
    assert peft.fingerprint(backbones.create("dinov2", seed=1, **kw)) != peft.fingerprint(a)
    peft.attach(a, [peft.LoRA(r=2, targets=["qkv"])], backbone_id="dinov2")
    clf = peft.Classifier(a, LinearHead(384, 2), labels=["n", "p"]).eval()
    peft.save(clf, tmp_path / "b", backbone_id="dinov2", backbone_kwargs=kw, preprocessing=preprocessing_dict(28))
    again = peft.from_bundle(tmp_path / "b").eval()  # checks the fingerprint: raised before the fix
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(again(x), clf(x), atol=1e-5)


def test_dinov2_offline_without_cache_fails_fast_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    import shared.checkpoints

    monkeypatch.setattr(shared.checkpoints, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(shared.checkpoints.CheckpointUnavailable) as e:
        backbones.create("dinov2", size="s", img_size=28)
    msg = str(e.value)
    assert "\n" not in msg and "'timm/vit_small_patch14_dinov2.lvd142m'" in msg
    assert "download it once while online" in msg and "--model.backbone_kwargs.weights" in msg
    with pytest.raises(shared.checkpoints.CheckpointUnavailable, match="nowhere.safetensors: not found"):
        backbones.create("dinov2", size="s", img_size=28, weights=str(tmp_path / "nowhere.safetensors"))


def test_probe_config_error_names_the_recipe_line(tmp_path, capsys):
    from medical import probe
    from shared.cli import friendly

    recipe = tmp_path / "probe.yaml"
    recipe.write_text((RECIPES / "probe_demo.yaml").read_text() + "epochz: 3\n")
    line = len(recipe.read_text().splitlines())
    assert friendly(probe.main, ["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {recipe} line {line}: ") and "epochz" in err


@pytest.mark.parametrize("k", ["0", "-1", "two"])
def test_predict_top_k_must_be_positive(cls_bundle, tmp_path, capsys, k):
    with pytest.raises(SystemExit) as e:
        predict.main(["--adapter", str(cls_bundle), "--top-k", k, str(_png(tmp_path / "x.png", 32, 32))])
    assert e.value.code == 2 and f"must be a positive integer, got {k}" in capsys.readouterr().err
