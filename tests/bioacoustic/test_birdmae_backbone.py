"""Bird-MAE in our timm definition: hub checkpoint keys load strictly through checkpoint_filter_fn."""
import pytest
import torch
import torch.nn.functional as F

from audio.birds import birdmae
from shared import backbones


def hub_state(dim=32, depth=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in birdmae.hub_state_dict_shapes(dim, depth).items()}


def test_hub_key_layout_loads_strictly_through_filter():
    model = birdmae.build(32, 2, 4)
    sd = hub_state()
    assert len(sd) == 8 + 2 * 12  # 4 tensors outside the blocks x 2 (+ norms) and 12 per block
    filtered = birdmae.checkpoint_filter_fn(sd, model)
    assert set(sd) - set(filtered) == {"fc_norm.weight", "fc_norm.bias"}  # pooled-output norm: dropped
    model.load_state_dict(filtered, strict=True)
    ours = model.state_dict()
    for k in filtered:
        assert torch.equal(ours[k], sd[k]), k


def test_research_checkpoint_prefixes_and_decoder_are_handled():
    model = birdmae.build(32, 2, 4)
    sd = {f"encoder.{k}": v for k, v in hub_state().items()}
    sd.update({"decoder.blocks.0.norm1.weight": torch.ones(3), "mask_token": torch.zeros(1, 1, 32)})
    model.load_state_dict(birdmae.checkpoint_filter_fn(sd, model), strict=True)


def test_wrong_width_names_the_key():
    model = birdmae.build(32, 2, 4)
    with pytest.raises(ValueError, match="cls_token"):
        birdmae.checkpoint_filter_fn(hub_state(dim=48), model)


def test_pos_embed_resized_for_fewer_frames_keeps_cls_position():
    model = birdmae.build(32, 1, 4, frames=256)  # 16 x 8 patches
    sd = hub_state(depth=1)
    out = birdmae.checkpoint_filter_fn(sd, model)
    assert out["pos_embed"].shape == (1, 1 + 16 * 8, 32)
    assert torch.equal(out["pos_embed"][:, 0], sd["pos_embed"][:, 0])
    # halving the time axis bilinearly (align_corners False) averages time rows 2t and 2t+1
    grid = sd["pos_embed"][0, 1:].reshape(32, 8, 32)
    assert torch.allclose(out["pos_embed"][0, 1:].reshape(16, 8, 32)[3], 0.5 * (grid[6] + grid[7]), atol=1e-6)
    model.load_state_dict(out, strict=True)


def test_token_layout_is_time_major_as_in_the_checkpoint():
    """With no blocks, token 1 + t*8 + f = LayerNorm(patch (t, f) . W + b + pos); input (B, 1, 512 frames, 128 mel)."""
    model = birdmae.build(32, 0, 4).eval()
    x = torch.randn(1, 1, 512, 128)
    tokens = model.forward_features(x)
    assert tokens.shape == (1, 257, 32) and tuple(model.patch_embed.grid_size) == (32, 8)
    t, f = 5, 3
    patch = x[0, 0, 16 * t:16 * t + 16, 16 * f:16 * f + 16]
    w, b = model.patch_embed.proj.weight, model.patch_embed.proj.bias
    emb = (w[:, 0] * patch).sum((-1, -2)) + b + model.pos_embed[0, 1 + t * 8 + f]
    ref = F.layer_norm(emb, (32,), model.norm.weight, model.norm.bias, eps=1e-6)
    assert torch.allclose(tokens[0, 1 + t * 8 + f], ref, atol=1e-5)


def test_tiny_variant_is_seeded_and_registered():
    a = backbones.create("tiny-bird-mae", seed=3, embed_dim=16, depth=1, num_heads=2)
    b = backbones.create("tiny-bird-mae", seed=3, embed_dim=16, depth=1, num_heads=2)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert a.patch_embed.proj.weight.shape == (16, 1, 16, 16)
    assert backbones.anatomy(a).num_prefix_tokens == 1


def test_sizes_match_the_hub_configs():
    assert birdmae.SIZES == {"base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16)}


def test_offline_without_cache_fails_fast_naming_the_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(birdmae.CheckpointUnavailable, match="DBD-research-group/Bird-MAE-Large"):
        birdmae.bird_mae(size="large")


def test_local_safetensors_checkpoint_and_bad_file(tmp_path):
    from safetensors.torch import save_file

    sd = hub_state()
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert set(birdmae._load_state(tmp_path)) == set(sd)  # a folder holding model.safetensors
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(birdmae.CheckpointUnavailable, match="bad.safetensors"):
        birdmae._load_state(bad)
    with pytest.raises(ValueError, match="size must be one of"):
        birdmae.bird_mae(size="medium")
