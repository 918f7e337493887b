"""Segmentation on tiny DINOv2-architecture ViTs: multi-block tokens, decoders, metrics, bundles, Lightning."""
from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader, TensorDataset

from shared import backbones, peft
from shared.artifacts import BundleError
from medical.segmentation import (
    LinearDecoder, SegmentationModule, Segmenter, UNetDecoder, build_decoder, load_segmenter,
    multi_block_tokens, predict_volume, save_segmenter, volume_metrics,
)

DIM = 32  # tiny-vit width


def vit(**kw):
    """tiny-vit, 32 px, patch 8 (grid 4 x 4); seeded, so a rebuild has the same weights."""
    return backbones.create("tiny-vit", **{"img_size": 32, "patch_size": 8, **kw}).eval()


def squares(n: int, size: int = 32, seed: int = 0):
    """Bright squares (side 10-18) on a dark noisy background; the mask is the square."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.1, (n, 3, size, size)).astype(np.float32)
    y = np.zeros((n, 1, size, size), np.int64)
    for i in range(n):
        s = int(rng.integers(10, 19))
        r, c = rng.integers(0, size - s + 1, 2)
        x[i, :, r:r + s, c:c + s] += 1.0
        y[i, 0, r:r + s, c:c + s] = 1
    return torch.from_numpy(x), torch.from_numpy(y)


METHODS = {
    "frozen": [],
    "lora": [{"name": "lora", "r": 4, "targets": ["qkv"]}],
    "prompt": [{"name": "prompt", "n_tokens": 3, "deep": True}],
    "adapter+prompt": [{"name": "adapter", "bottleneck": 8}, {"name": "prompt", "n_tokens": 2, "deep": False}],
}


# --- multi-block tokens ----------------------------------------------------------------------
@pytest.mark.parametrize("methods", list(METHODS), ids=list(METHODS))
@pytest.mark.parametrize("regs", [0, 4])
def test_last_block_equals_forward_tokens(methods, regs):
    bb = peft.attach(vit(depth=3, reg_tokens=regs), METHODS[methods])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        toks = multi_block_tokens(bb, x, blocks=3)
        final = backbones.anatomy(bb).forward_tokens(x)
    assert len(toks) == 3
    for t in toks:
        assert t.x.shape == (2, 1 + regs + 16, DIM) and t.num_prefix == 1 + regs and t.grid == (4, 4)
        assert t.patch_map().shape == (2, DIM, 4, 4)
    torch.testing.assert_close(toks[-1].x, final.x, rtol=0, atol=0)


def test_intermediate_blocks_drop_prompts_not_patches():
    """Deep prompts occupy positions [prefix, prefix + n) of every block's input; what we keep of
    block -2 must be exactly the prefix and patch tokens the last block receives."""
    n, regs = 3, 4
    bb = peft.attach(vit(depth=3, reg_tokens=regs), [peft.Prompt(n_tokens=n, deep=True)])
    seen = {}
    bb.blocks[-1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))  # after the prompt hook
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        toks = multi_block_tokens(bb, x, blocks=2)
        o = 1 + regs
        inp = seen["x"]  # (B, o + n + 16, D): block -2's output with the last block's prompts in place
        assert inp.shape[1] == o + n + 16
        want = bb.norm(torch.cat([inp[:, :o], inp[:, o + n:]], dim=1))
    torch.testing.assert_close(toks[0].x, want)


def test_multi_block_tokens_rejects_bad_requests():
    with pytest.raises(ValueError, match="1..2"):
        multi_block_tokens(vit(), torch.randn(1, 3, 32, 32), blocks=3)
    with pytest.raises(TypeError, match="VisionTransformer"):
        multi_block_tokens(backbones.create("tiny-swin"), torch.randn(1, 3, 32, 32))


# --- decoders --------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    {"kind": "linear", "blocks": 1}, {"kind": "linear", "blocks": 4},
    {"kind": "unet", "blocks": 4, "channels": [16, 8, 8, 4]}, {"kind": "unet", "blocks": 2, "channels": [8, 8, 4]},
], ids=["linear1", "linear4", "unet4", "unet2of3"])
@pytest.mark.parametrize("regs", [0, 4])
def test_decoders_give_logits_at_input_size(config, regs):
    bb = peft.attach(vit(depth=4, reg_tokens=regs), METHODS["lora"])
    dec = build_decoder({**config, "dim": DIM, "num_classes": 3})
    x = torch.randn(2, 3, 32, 32)
    logits = Segmenter(bb, dec)(x)
    assert logits.shape == (2, 3, 32, 32)
    logits.sum().backward()  # every decoder parameter and the PEFT tensors get a gradient
    assert all(p.grad is not None for p in dec.parameters())
    assert all(p.grad is not None for n, p in bb.named_parameters() if p.requires_grad)
    assert build_decoder(dec.config()).config() == dec.config()  # config round trip


def test_unet_rejects_more_blocks_than_stages():
    with pytest.raises(ValueError, match="blocks"):
        UNetDecoder(DIM, 2, blocks=3, channels=(8, 4))
    with pytest.raises(ValueError, match="unknown decoder"):
        build_decoder({"kind": "fpn", "dim": DIM, "num_classes": 2})


def test_linear_decoder_learns_bright_squares():
    torch.manual_seed(0)
    bb = peft.attach(vit(), [])
    dec = LinearDecoder(DIM, 2)
    model = Segmenter(bb, dec)
    xt, yt = squares(32, seed=0)
    xv, yv = squares(16, seed=1)

    def dice():
        pred = predict_volume(bb, dec, xv)  # the validation set as a "volume" of 16 slices
        return volume_metrics(pred, yv[:, 0], num_classes=2)["dice"]

    before = dice()
    frozen = {k: v.clone() for k, v in bb.state_dict().items()}
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(40):
        loss = loss_fn(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dice()
    assert after > 0.7 and after > before + 0.2, (before, after)
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in frozen.items())


# --- 3-D metrics -------------------------------------------------------------------------------
def cube(shape, lo, side, value=1):
    v = np.zeros(shape, np.int64)
    v[lo[0]:lo[0] + side, lo[1]:lo[1] + side, lo[2]:lo[2] + side] = value
    return v


def test_volume_metrics_known_values():
    shape = (16, 12, 12)
    # Two 4^3 cubes offset by one voxel on every axis overlap in 3^3: Dice = 2*27 / (64+64).
    m = volume_metrics(cube(shape, (2, 2, 2), 4), cube(shape, (3, 3, 3), 4), num_classes=2)
    assert m["dice"] == pytest.approx(54 / 128)
    # A 4^3 cube shifted by 3 voxels along one axis: overlap 1*4*4, Dice = 32/128. Every surface
    # voxel lies within 3 of the other surface and the whole trailing face (16 of 56 surface
    # voxels, > 5%) lies exactly 3 away, so HD95 = 3 (both directions).
    m = volume_metrics(torch.as_tensor(cube(shape, (2, 4, 4), 4)), cube(shape, (5, 4, 4), 4), num_classes=2)
    assert m["dice"] == pytest.approx(0.25)
    assert m["hd95"] == pytest.approx(3.0)
    assert volume_metrics(cube(shape, (2, 4, 4), 4), cube(shape, (5, 4, 4), 4), 2, spacing=(2.0, 1, 1))["hd95"] \
        == pytest.approx(6.0)


def test_volume_metrics_multiclass_and_empty_classes():
    shape = (16, 12, 12)
    pred = cube(shape, (2, 2, 2), 4, value=1) + cube(shape, (10, 2, 2), 2, value=2)
    label = cube(shape, (3, 3, 3), 4, value=1) + cube(shape, (10, 2, 2), 2, value=2)
    m = volume_metrics(pred, label, num_classes=4)  # class 3 absent from both: undefined, ignored
    assert m["dice_per_class"][:2] == pytest.approx([54 / 128, 1.0])
    assert np.isnan(m["dice_per_class"][2]) and np.isnan(m["hd95_per_class"][2])
    assert m["dice"] == pytest.approx((54 / 128 + 1.0) / 2)
    assert m["hd95_per_class"][1] == pytest.approx(0.0)
    # A structure missed entirely: Dice 0, and HD95 the volume's diagonal (it was nan and left
    # out, so missing a structure improved the mean HD95).
    missed = volume_metrics(np.zeros(shape, np.int64), label, num_classes=3)
    diagonal = float(np.sqrt(16 ** 2 + 12 ** 2 + 12 ** 2))
    assert missed["dice"] == 0.0 and missed["hd95"] == pytest.approx(diagonal)
    assert missed["hd95_per_class"] == pytest.approx([diagonal, diagonal])
    mm = volume_metrics(np.zeros(shape, np.int64), label, num_classes=3, spacing=(5.0, 0.8, 0.8))
    assert mm["hd95"] == pytest.approx(float(np.sqrt(80 ** 2 + 9.6 ** 2 + 9.6 ** 2)), rel=1e-5)
    # A structure predicted where there is none: Dice 0 (not undefined) and the diagonal too.
    ghost = volume_metrics(cube(shape, (10, 2, 2), 2, value=3), np.zeros(shape, np.int64), num_classes=4)
    assert ghost["dice_per_class"][2] == 0.0 and ghost["hd95_per_class"][2] == pytest.approx(diagonal)
    assert np.isnan(ghost["dice_per_class"][0]) and ghost["dice"] == 0.0


def test_predict_volume_matches_forward_and_restores_mode():
    bb = peft.attach(vit(), METHODS["lora"])
    dec = UNetDecoder(DIM, 3, blocks=2, channels=(8, 4))
    dec.train()
    vol = torch.randn(5, 3, 32, 32)
    labels = predict_volume(bb, dec, vol.numpy(), batch=2)
    assert labels.shape == (5, 32, 32) and labels.dtype == torch.long
    assert dec.training and not bb.training
    dec.eval()
    with torch.no_grad():
        assert torch.equal(labels, Segmenter(bb, dec)(vol).argmax(1))


# --- bundles -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "unet"])
def test_bundle_round_trip_is_exact(tmp_path, kind):
    torch.manual_seed(0)
    mod = SegmentationModule(backbone="tiny-vit", backbone_kwargs={"img_size": 32, "patch_size": 8, "depth": 2},
                             methods=METHODS["lora"] + [{"name": "prompt", "n_tokens": 2}],
                             decoder={"kind": kind, "blocks": 2, **({"channels": [8, 4]} if kind == "unet" else {})},
                             num_classes=3, labels=["background", "liver", "tumour"], preprocessing={"size": 32})
    seg = mod.model
    # Train a little so BatchNorm statistics and adapter weights are no longer at their init.
    opt = torch.optim.AdamW([p for p in seg.parameters() if p.requires_grad], lr=1e-2)
    x, y = squares(4)
    for _ in range(2):
        loss = mod.loss_fn(seg(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seg.eval()
    with torch.no_grad():
        want = seg(x)
    mod.save_bundle(tmp_path / "bundle", metrics={"val/dice": 0.5})
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == \
        ["adapter.json", "adapter.safetensors", "decoder.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging leftovers

    backbone, decoder, meta = load_segmenter(tmp_path / "bundle")
    assert meta["labels"] == ["background", "liver", "tumour"] and meta["decoder"]["config"] == seg.decoder.config()
    with torch.no_grad():
        got = Segmenter(backbone, decoder)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The plain PEFT API still reads the backbone part of the bundle.
    assert isinstance(peft.from_bundle(tmp_path / "bundle"), torch.nn.Module)


def test_bundle_frozen_backbone_and_corruption(tmp_path):
    bb = peft.attach(vit(), [], backbone_id="tiny-vit")
    dec = LinearDecoder(DIM, 2)
    path = save_segmenter(bb, dec, tmp_path / "b", backbone_id="tiny-vit",
                          backbone_kwargs={"img_size": 32, "patch_size": 8})
    backbone, decoder, _ = load_segmenter(path, backbone=vit())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(Segmenter(backbone, decoder)(x), Segmenter(bb, dec.eval())(x), rtol=0, atol=0)
    with pytest.raises(BundleError, match="labels"):
        save_segmenter(bb, dec, tmp_path / "c", labels=["a", "b", "c"])
    raw = bytearray((path / "decoder.safetensors").read_bytes())
    raw[-1] ^= 1
    (path / "decoder.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="checksum"):
        load_segmenter(path)
    meta = json.loads((path / "adapter.json").read_text())
    del meta["decoder"]
    (path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="not a segmentation bundle"):
        load_segmenter(path)


# --- Lightning -------------------------------------------------------------------------------
def test_module_trains_only_decoder_and_peft_and_checkpoints_them(tmp_path):
    torch.manual_seed(0)
    mod = SegmentationModule(backbone="tiny-vit", backbone_kwargs={"img_size": 32, "patch_size": 8},
                             methods=METHODS["lora"], decoder={"kind": "linear", "blocks": 2},
                             num_classes=2, labels=["background", "square"], lr=1e-2, warmup_fraction=0.2)
    seg = mod.model
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoder.") or "lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in seg.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in seg.named_parameters() if p.requires_grad}
    x, y = squares(16)
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(*squares(8, seed=1)), batch_size=4)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(mod, train, val)
    after = dict(seg.named_parameters())
    assert all(torch.equal(v, after[n]) for n, v in frozen.items())
    assert all(not torch.equal(v, after[n]) for n, v in start.items())
    for key in ("val/dice", "val/hd95", "val/loss"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    assert 0.0 <= float(trainer.callback_metrics["val/dice"]) <= 1.0

    best = trainer.checkpoint_callback.best_model_path
    assert best.endswith("best.ckpt") and trainer.checkpoint_callback.monitor == "val/dice"
    state = torch.load(best, weights_only=False)["state_dict"]
    assert set(state) == {f"model.{n}" for n in trainable} | {
        f"model.{n}" for n, _ in seg.decoder.named_buffers(prefix="decoder")}
    res = trainer.test(mod, val, ckpt_path="best", verbose=False)[0]
    assert {"test/dice", "test/hd95"} <= set(res)

    reloaded = SegmentationModule.load_from_checkpoint(best)
    reloaded.eval(), mod.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x[:2]), mod(x[:2]), rtol=0, atol=0)


def test_module_validates_arguments():
    with pytest.raises(ValueError, match="labels"):
        SegmentationModule(num_classes=3, labels=["a", "b"])
    with pytest.raises(ValueError, match="blocks"):
        SegmentationModule(backbone_kwargs={"depth": 2}, decoder={"kind": "unet", "blocks": 4})


# --- issue 13: split-level Dice, penalised misses, native resolution and units ---------------------
def _decathlon_slices(tmp_path, med, img_size=16):
    from medical.data import DecathlonDataModule

    dm = DecathlonDataModule(med.write_decathlon(tmp_path / "Task09_Spleen"), img_size=img_size, batch_size=4)
    dm.setup("test")
    return dm, list(dm.test_dataloader())


def _val_log(mod, batches):
    logged = {}
    mod.log = lambda *a, **k: None
    mod.log_dict = lambda d, **k: logged.update({k_: float(v) for k_, v in d.items()})
    for logits, y in batches:
        mod.forward = lambda x, _l=logits: _l
        mod._shared_step((torch.zeros(len(y), 3, *y.shape[-2:]), y), "val")
    mod._log_metrics("val")
    return logged


def test_split_dice_counts_false_positives_on_empty_slices_and_misses_worsen_hd95(tmp_path, med):
    dm, batches = _decathlon_slices(tmp_path, med)
    masks = torch.cat([y for _, y in batches])  # (N, 16, 16): the spleen is on 2 of the 4 slices per volume
    empty = ~masks.flatten(1).any(1)
    assert empty.any() and (~empty).any()
    pred = masks.clone()
    pred[empty, 0:2, 0:2] = 1  # 4 false-positive pixels on every slice without the structure
    missed = torch.nonzero(~empty)[0, 0]
    pred[missed] = 0  # and one slice where the structure is missed entirely
    tp = int((pred.bool() & masks.bool()).sum())
    fp = int((pred.bool() & ~masks.bool()).sum())
    fn = int((~pred.bool() & masks.bool()).sum())
    logits = torch.nn.functional.one_hot(pred, 2).permute(0, 3, 1, 2).float()
    mod = SegmentationModule(backbone_kwargs={"img_size": 16, "patch_size": 8}, num_classes=2)
    got = _val_log(mod, [(logits[i:i + 4], masks[i:i + 4]) for i in range(0, len(masks), 4)])
    assert got["val/dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))  # pooled over the split
    assert got["val/dice"] < 0.9
    # per slice: 1.0 on every slice with the structure but the missed one; empty slices are nan
    n_present = int((~empty).sum())
    assert got["val/dice_slice_mean"] == pytest.approx((n_present - 1) / n_present)
    # HD95: 0 where the prediction is exact, the 16 px diagonal for the miss and each false positive
    diagonal = float(np.hypot(16, 16))
    assert got["val/hd95"] == pytest.approx(diagonal * (int(empty.sum()) + 1) / len(masks))
    assert SegmentationModule.metric_units["test/hd95"].startswith("px")


def test_score_volume_at_native_resolution_with_the_files_spacing(tmp_path, med, monkeypatch):
    import nibabel as nib

    import medical.segmentation as seg
    from medical.io import read_spacing

    dm, _ = _decathlon_slices(tmp_path, med, img_size=8)  # the model sees 8 x 8; labels are 16 x 16
    img, lbl = dm.volumes("test")[0]
    label = np.asarray(nib.load(str(lbl)).dataobj)
    nib.save(nib.Nifti1Image(label, np.diag([0.8, 0.8, 5.0, 1.0])), str(lbl))  # CT: 0.8 mm in-plane, 5 mm slices
    assert read_spacing(lbl) == pytest.approx((0.8, 0.8, 5.0))
    shifted = np.roll(label, 1, axis=0)  # one voxel off along the first axis
    seen = {}

    def oracle(backbone, decoder, x, batch=16, size=None):
        seen["size"], seen["slices"] = tuple(size), x.shape
        return torch.from_numpy(shifted).long().permute(2, 0, 1)  # (D, H, W)

    monkeypatch.setattr(seg, "predict_volume", oracle)
    scores = seg.score_volume(None, None, dm, img, lbl)
    assert seen["size"] == (16, 16) and seen["slices"] == (4, 3, 8, 8)  # predicted at 8, scored at 16
    voxels = volume_metrics(shifted, label, 2)
    assert scores["hd95_unit"] == "mm" and voxels["hd95"] > 0
    assert scores["hd95"] == pytest.approx(0.8 * voxels["hd95"])  # the shift is along a 0.8 mm axis
    assert scores["dice"] == pytest.approx(voxels["dice"])


def test_predict_volume_resizes_logits_to_the_native_size():
    net = vit()
    dec = LinearDecoder(DIM, 3, blocks=1).eval()
    x = torch.randn(2, 3, 32, 32)
    small = predict_volume(net, dec, x)
    big = predict_volume(net, dec, x, size=(48, 40))
    assert small.shape == (2, 32, 32) and big.shape == (2, 48, 40)
    with torch.no_grad():
        logits = Segmenter(net, dec)(x)
    ref = torch.nn.functional.interpolate(logits, size=(48, 40), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(big, ref)
