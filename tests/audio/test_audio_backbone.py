"""audio.backbone: loading an AST checkpoint at another frame count by interpolating the time
axis of its positional embedding (the anchor re-initialises it instead)."""
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


def cosine(a, b) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_pos_embed_interpolated_along_time(ckpt):
    from audio.backbone import load_ast

    path, sd = ckpt
    model = load_ast(str(path), max_length=500)
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
    ref = reference_grid(sd[POS])
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
    torch.testing.assert_close(pos, reference_grid(sd[POS], new=(12, 9)), atol=1e-6, rtol=0)
    anat = backbones.anatomy(model)
    assert anat.embed_dim == 32
    with torch.no_grad():
        assert model(torch.randn(1, 100, 128)).last_hidden_state.shape == (1, 110, 32)
