"""DINOv2 loading from a local weights file, at another input size; multi-block probe features."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from medical.backbone import last_blocks_tokens, probe_features, timm_name
from shared.backbones import anatomy, create


def test_timm_names():
    assert timm_name("b") == "vit_base_patch14_dinov2.lvd142m"
    assert timm_name("g", registers=True) == "vit_giant_patch14_reg4_dinov2.lvd142m"
    with pytest.raises(ValueError, match="size must be one of"):
        timm_name("xl")


@pytest.mark.parametrize("registers", [False, True])
def test_local_weights_load_and_pos_embed_is_resized(tmp_path, registers):
    torch.manual_seed(0)
    src = timm.create_model(timm_name("s", registers).split(".")[0], pretrained=False, num_classes=0)  # 518 px
    with torch.no_grad():
        src.pos_embed.normal_()
    sd = src.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    model = create("dinov2", size="s", registers=registers, img_size=56, weights=str(tmp_path / "w.safetensors"))
    got = model.state_dict()
    assert torch.equal(got["blocks.3.mlp.fc1.weight"], sd["blocks.3.mlp.fc1.weight"])
    n_prefix = 0 if src.no_embed_class else src.num_prefix_tokens
    want = resample_abs_pos_embed(sd["pos_embed"], new_size=(4, 4), old_size=(37, 37), num_prefix_tokens=n_prefix)
    torch.testing.assert_close(got["pos_embed"], want)
    assert anatomy(model).num_prefix_tokens == (5 if registers else 1)


def test_probe_features_are_the_last_blocks_cls_and_patch_mean():
    model = create("tiny-vit", img_size=32, depth=4, reg_tokens=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        toks = last_blocks_tokens(model, x, 4)
        feats = probe_features(model, x, 4)
        final = anatomy(model).forward_tokens(x)
    assert torch.equal(toks[-1].x, final.x)
    assert torch.equal(feats["cls_1"], final.x[:, 0])
    assert torch.equal(feats["cls_4"][:, -32:], final.x[:, 0])
    torch.testing.assert_close(feats["patch_mean"], final.x[:, 5:].mean(1))
    # each earlier block is normalised by the final norm, as DINOv2's multi-block probes do
    assert feats["cls_4"].shape == (2, 4 * 32)
    assert not torch.equal(feats["cls_4"][:, :32], feats["cls_4"][:, 32:64])
