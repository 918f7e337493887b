"""audio.backbone: loading an AST checkpoint at another frame count by resizing the time axis of
its positional embedding (centre crop for fewer frames, as the original AST code does;
interpolation on request or for more frames). The anchor re-initialises it instead."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

POS = "embeddings.position_embeddings"
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def save_tiny_ast(path, num_mel_bins=128, max_length=1024, seed=0):
    """A tiny ASTModel with seeded random weights AND a smooth random positional embedding
    (a pretrained AST's positions vary smoothly over the grid), saved with save_pretrained."""
    from transformers import ASTConfig, ASTModel

    torch.manual_seed(seed)
    model = ASTModel(ASTConfig(**TINY, num_mel_bins=num_mel_bins, max_length=max_length)).eval()
    f = (num_mel_bins - 16) // 10 + 1
    t = (max_length - 16) // 10 + 1
    coarse = torch.randn(1, 32, 4, 8)
    grid = F.interpolate(coarse, size=(f, t), mode="bilinear", align_corners=False) + 0.05 * torch.randn(1, 32, f, t)
    pos = torch.cat([torch.randn(1, 2, 32), grid.flatten(2).transpose(1, 2)], dim=1)
    with torch.no_grad():
        model.embeddings.position_embeddings.copy_(pos)
        model.embeddings.cls_token.normal_()
        model.embeddings.distillation_token.normal_()
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ast_ckpt")
    model = save_tiny_ast(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def reference_grid(pos: torch.Tensor, old=(12, 101), new=(12, 49)) -> torch.Tensor:
    """The expected positional embedding, computed here independently of audio.backbone."""
    d = pos.shape[-1]
    grid = pos[0, 2:].reshape(*old, d).permute(2, 0, 1).unsqueeze(0)  # (1, D, F, T)
    grid = F.interpolate(grid, size=new, mode="bilinear", align_corners=False)
    return torch.cat([pos[:, :2], grid[0].permute(1, 2, 0).reshape(1, -1, d)], dim=1)


def crop_reference(pos: torch.Tensor, old=(12, 101), new_t: int = 49) -> torch.Tensor:
    """The original AST code's rule, by explicit index arithmetic: new time column j is old column
    old_t//2 - new_t//2 + j (101 -> 49: columns 26..74), every frequency row kept."""
    f_rows, old_t = old
    start = old_t // 2 - new_t // 2
    rows = [pos[0, :2]]
    for f in range(f_rows):
        for j in range(new_t):
            rows.append(pos[0, 2 + f * old_t + start + j][None])
    return torch.cat(rows)[None]


def cosine(a, b) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_pos_embed_cropped_along_time_by_default(ckpt):
    """500 frames = 49 time patches: the default keeps the checkpoint's centre columns 26..74 of
    101 bit for bit (10 ms spacing kept), as YuanGongND/ast's `50 - t//2 : 50 - t//2 + t`."""
    from audio.backbone import load_ast

    path, sd = ckpt
    model = load_ast(str(path), max_length=500)
    pos, orig = model.embeddings.position_embeddings.detach(), sd[POS]
    assert pos.shape == (1, 2 + 12 * 49, 32)
    assert torch.equal(pos, crop_reference(orig, new_t=49))
    # hand-picked positions: (row 0, column 0) <- old (0, 26); (row 11, column 48) <- old (11, 74)
    assert torch.equal(pos[0, 2], orig[0, 2 + 26])
    assert torch.equal(pos[0, 2 + 11 * 49 + 48], orig[0, 2 + 11 * 101 + 74])
    assert torch.equal(pos[:, :2], orig[:, :2])
    # differs from the old bilinear squeeze, which moved every position
    assert not torch.allclose(pos, reference_grid(orig), atol=1e-3)
    with torch.no_grad():
        assert model(torch.randn(1, 500, 128)).last_hidden_state.shape == (1, 2 + 12 * 49, 32)


def test_pos_embed_interpolated_by_hand(ckpt):
    """pos_resize="interpolate": new column j = linear blend of old columns at
    s = (j + 0.5) * 101 / 49 - 0.5 (align_corners=False), computed here without F.interpolate."""
    from audio.backbone import load_ast

    path, sd = ckpt
    pos = load_ast(str(path), max_length=500, pos_resize="interpolate").embeddings.position_embeddings.detach()
    orig = sd[POS][0, 2:].reshape(12, 101, 32).double()
    for j in (0, 1, 24, 48):
        s = max((j + 0.5) * 101 / 49 - 0.5, 0.0)
        lo = int(s)
        w = s - lo
        hi = min(lo + 1, 100)
        expected = (1 - w) * orig[:, lo] + w * orig[:, hi]  # (12, 32): every frequency row
        got = pos[0, 2:].reshape(12, 49, 32)[:, j].double()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # j = 0: s = 0.5306..., so 0.4694 * column 0 + 0.5306 * column 1
    torch.testing.assert_close(pos[0, 2].double(), 0.46938775510204 * orig[0, 0] + 0.53061224489796 * orig[0, 1],
                               atol=1e-5, rtol=0)


def test_pos_embed_longer_input_is_interpolated_in_both_modes(ckpt):
    """More frames than the checkpoint (1100 -> 109 columns): the AST code interpolates; so do we."""
    from audio.backbone import load_ast

    path, sd = ckpt
    crop = load_ast(str(path), max_length=1100).embeddings.position_embeddings.detach()
    interp = load_ast(str(path), max_length=1100, pos_resize="interpolate").embeddings.position_embeddings.detach()
    assert crop.shape == (1, 2 + 12 * 109, 32)
    torch.testing.assert_close(crop, reference_grid(sd[POS], new=(12, 109)), atol=1e-6, rtol=0)
    assert torch.equal(crop, interp)


def test_resize_pos_embed_crops_frequency_and_grows_time_by_hand():
    """Mixed case on a grid whose value is 100*f + t: 5 -> 3 frequency rows keep rows 1..3
    (5//2 - 3//2 = 1); 7 -> 9 time columns are interpolated, value 100*f + clamp(s, 0, 6)."""
    from audio.backbone import resize_pos_embed

    f0, t0, f1, t1 = 5, 7, 3, 9
    grid = torch.tensor([[100.0 * f + t for t in range(t0)] for f in range(f0)])  # (5, 7)
    pos = torch.cat([torch.tensor([[-1.0], [-2.0]]), grid.reshape(-1, 1)])[None].expand(1, -1, 2).contiguous()
    out = resize_pos_embed(pos, (f0, t0), (f1, t1))
    assert out.shape == (1, 2 + f1 * t1, 2)
    assert out[0, :2, 0].tolist() == [-1.0, -2.0]
    for i, f in enumerate((1, 2, 3)):
        for j in range(t1):
            s = min(max((j + 0.5) * t0 / t1 - 0.5, 0.0), t0 - 1)
            assert abs(out[0, 2 + i * t1 + j, 0].item() - (100 * f + s)) < 1e-4, (i, j)
    with pytest.raises(ValueError, match="pos_resize"):
        resize_pos_embed(pos, (f0, t0), (f1, t1), mode="nearest")


def test_unknown_pos_resize_is_refused_before_loading(tmp_path):
    from audio.backbone import load_ast

    with pytest.raises(ValueError, match="pos_resize"):
        load_ast(str(tmp_path / "nothing-here"), max_length=500, pos_resize="squeeze")


def test_pos_embed_interpolated_along_time(ckpt):
    from audio.backbone import load_ast

    path, sd = ckpt
    model = load_ast(str(path), max_length=500, pos_resize="interpolate")
    assert model.config.max_length == 500 and model.config.num_mel_bins == 128
    pos, orig = model.embeddings.position_embeddings.detach(), sd[POS]
    assert orig.shape == (1, 2 + 12 * 101, 32) and pos.shape == (1, 2 + 12 * 49, 32)
    assert torch.equal(pos[:, :2], orig[:, :2])  # CLS + distillation positions as trained
    torch.testing.assert_close(pos, reference_grid(orig), atol=1e-6, rtol=0)
    # every other tensor is the checkpoint's, bit for bit
    new_sd = model.state_dict()
    assert set(new_sd) == set(sd)
    for k, v in sd.items():
        if k != POS:
            assert torch.equal(new_sd[k], v), k
    # and the model runs on 500-frame inputs
    with torch.no_grad():
        out = model(torch.randn(2, 500, 128)).last_hidden_state
    assert out.shape == (2, 2 + 12 * 49, 32) and torch.isfinite(out).all()


def test_anchor_from_pretrained_loses_the_positions(ckpt):
    """The anchor's `from_pretrained(max_length=L, ignore_mismatched_sizes=True)` drops the
    pretrained positional embedding (transformers re-initialises it, to zeros); ours keeps it."""
    from transformers import ASTModel

    from audio.backbone import load_ast

    path, sd = ckpt
    ref = crop_reference(sd[POS], new_t=49)
    anchor = ASTModel.from_pretrained(str(path), max_length=500, ignore_mismatched_sizes=True)
    ours = load_ast(str(path), max_length=500)
    a_pos = anchor.embeddings.position_embeddings.detach()
    o_pos = ours.embeddings.position_embeddings.detach()
    assert a_pos.shape == o_pos.shape == ref.shape
    assert cosine(o_pos, ref) > 0.999
    assert abs(cosine(a_pos, ref)) < 0.1  # nothing of the pretrained positions survives
    assert not torch.allclose(a_pos, o_pos, atol=1e-3)
    assert not torch.equal(a_pos[:, :2], sd[POS][:, :2])  # even CLS / distillation positions lost
    # the rest of the anchor's weights do load: the position embedding is the only casualty
    a_sd = anchor.state_dict()
    assert all(torch.equal(a_sd[k], v) for k, v in sd.items() if k != POS)


@pytest.mark.parametrize("max_length", [None, 1024])
def test_same_length_returns_checkpoint_unchanged(ckpt, max_length):
    from audio.backbone import load_ast

    path, sd = ckpt
    model = load_ast(str(path), max_length=max_length)
    assert model.config.max_length == 1024
    new_sd = model.state_dict()
    assert set(new_sd) == set(sd) and all(torch.equal(new_sd[k], v) for k, v in sd.items())


def test_checkpoint_with_other_mel_bins_is_a_clear_error(tmp_path):
    from audio.backbone import load_ast

    save_tiny_ast(tmp_path, num_mel_bins=64)  # 5 frequency rows x 101 time columns
    with pytest.raises(ValueError, match="mel_bins"):
        load_ast(str(tmp_path), max_length=500, num_mel_bins=128)


@pytest.mark.parametrize("ckpt_cfg,request_cfg", [
    # same frame count: load_ast returns the checkpoint and silently drops num_mel_bins
    (dict(num_mel_bins=64, max_length=1024), dict(num_mel_bins=128, max_length=1024)),
    # 12 x 100 = 1200 patches divide by the requested 5 rows: the grid is silently mis-reshaped
    (dict(num_mel_bins=128, max_length=1006), dict(num_mel_bins=64, max_length=500)),
])
def test_mel_bin_mismatch_never_loads_silently(tmp_path, ckpt_cfg, request_cfg):
    """Regression (load_ast / checkpoint_filter_fn): the old positional grid was
    inferred as (f_new, n_old // f_new) from the NEW model's frequency rows instead of the
    checkpoint's own config, and `config_overrides` are ignored when max_length equals the
    checkpoint's. A num_mel_bins different from the checkpoint's must raise, not load."""
    from audio.backbone import load_ast

    save_tiny_ast(tmp_path, **ckpt_cfg)
    with pytest.raises(ValueError, match="mel"):
        model = load_ast(str(tmp_path), **request_cfg)
        print("loaded", model.config.num_mel_bins, model.config.max_length,
              tuple(model.embeddings.position_embeddings.shape))


def test_registered_lazily_in_shared_backbones(ckpt, monkeypatch):
    import audio
    from shared import backbones

    path, sd = ckpt
    # forget the registration, as in a fresh process that never imported audio.backbone
    if "audio.backbone" in sys.modules:
        monkeypatch.setattr(audio, "backbone", sys.modules["audio.backbone"], raising=False)
        monkeypatch.delitem(sys.modules, "audio.backbone")
    monkeypatch.delitem(backbones.BACKBONES, "ast", raising=False)
    model = backbones.create("ast", checkpoint=str(path), max_length=100)
    assert "ast" in backbones.BACKBONES
    pos = model.embeddings.position_embeddings.detach()
    assert pos.shape == (1, 2 + 12 * 9, 32)
    assert torch.equal(pos, crop_reference(sd[POS], new_t=9))  # 100 frames: columns 46..54 of 101
    anat = backbones.anatomy(model)
    assert anat.embed_dim == 32
    with torch.no_grad():
        assert model(torch.randn(1, 100, 128)).last_hidden_state.shape == (1, 110, 32)
