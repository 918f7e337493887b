"""Backbone anatomies and a small registry of backbone constructors.

`anatomy(model)` describes any supported model to the PEFT methods. `create(name)` builds a
backbone by registered name; the `tiny-*` entries are small randomly initialised models built
from the real classes, used by the tests and the offline demos.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch
from torch import nn

from .anatomy import PLACEMENTS, Anatomy, Sublayer, UnsupportedMethod, anatomy, register_anatomy, sdpa_with_prefix
from .families import ASTAnatomy, DecoderAnatomy, EncoderAnatomy, SwinAnatomy, ViTAnatomy, square_grid

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
# Loaders that live in domain packages, imported on first use.
LAZY = {"ast": "audio.backbone", "dinov2": "medical.backbone", "bird-mae": "audio.birds.birdmae",
        "tiny-bird-mae": "audio.birds.birdmae", "swin-t": "vision.backbone",
        "hf-encoder": "text.backbone", "hf-causal-lm": "text.backbone", "tiny-llama-lm": "text.backbone",
        "whisper": "audio.whisper", "tiny-whisper": "audio.whisper"}


def register_backbone(name: str, seeded: bool = False):
    """Register a constructor. `seeded` ones take `seed=` and build the same weights every time,
    so a bundle trained on a random test model can be loaded into a rebuilt one."""
    def deco(fn):
        if seeded:
            @functools.wraps(fn)
            def build(seed: int = 0, **kw):
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    return fn(**kw)
            BACKBONES[name] = build
        else:
            BACKBONES[name] = fn
        return fn
    return deco


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone (`tiny-vit`, `ast`, ...) by name."""
    if name not in BACKBONES and name in LAZY:
        importlib.import_module(LAZY[name])
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(sorted(set(BACKBONES) | set(LAZY)))}")
    model = BACKBONES[name](**kwargs)
    # Remember how it was built, so a saved bundle can rebuild it (`shared.peft.from_bundle`).
    model.registry_source = {"id": name, "kwargs": dict(kwargs)}
    return model


@register_backbone("tiny-vit", seeded=True)
def tiny_vit(img_size: int = 32, reg_tokens: int = 0, in_chans: int = 3, embed_dim: int = 32,
             depth: int = 2, num_heads: int = 4, patch_size: int = 8, **kw) -> nn.Module:
    """DINOv2-architecture ViT (LayerScale, optional register tokens), random weights.

    LayerScale starts at 1.0 (DINOv2 uses 1e-5 before training) so that every block visibly
    shapes the output of a random model.
    """
    import timm

    return timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=img_size, patch_size=patch_size,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, reg_tokens=reg_tokens,
        in_chans=in_chans, num_classes=0, **{"init_values": 1.0, **kw})


@register_backbone("tiny-swin", seeded=True)
def tiny_swin(img_size: int = 32, embed_dim: int = 16, depths=(1, 1), num_heads=(2, 4),
              window_size: int = 4, **kw) -> nn.Module:
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size, embed_dim=embed_dim,
        depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size, num_classes=0, **kw)


@register_backbone("tiny-ast", seeded=True)
def tiny_ast(max_length: int = 64, num_mel_bins: int = 32, hidden_size: int = 32, layers: int = 2,
             heads: int = 4, **kw) -> nn.Module:
    from transformers import ASTConfig, ASTModel

    cfg = ASTConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=2 * hidden_size, max_length=max_length,
                    num_mel_bins=num_mel_bins, **kw)
    return ASTModel(cfg)


@register_backbone("tiny-llama", seeded=True)
def tiny_llama(hidden_size: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               vocab_size: int = 128, **kw) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=2 * hidden_size,
                      vocab_size=vocab_size, **kw)
    return LlamaModel(cfg)


@register_backbone("tiny-bert", seeded=True)
def tiny_bert(hidden_size: int = 32, layers: int = 2, heads: int = 4, vocab_size: int = 128, **kw) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden_size, vocab_size=vocab_size,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    return BertModel(cfg, add_pooling_layer=False)


__all__ = [
    "PLACEMENTS", "Anatomy", "Sublayer", "UnsupportedMethod", "anatomy", "register_anatomy",
    "sdpa_with_prefix", "square_grid", "ASTAnatomy", "DecoderAnatomy", "EncoderAnatomy",
    "SwinAnatomy", "ViTAnatomy", "BACKBONES", "register_backbone", "create",
]
