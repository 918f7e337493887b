"""Backbone anatomies and a small registry of backbone constructors.

`anatomy(model)` describes any supported model to the PEFT methods. `create(name)` builds a
backbone by registered name; the `tiny-*` entries are small randomly initialised models built
from the real classes, used by the tests and the offline demos.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import random
import sys
from typing import Any, Callable

import torch
from torch import nn

from .anatomy import (PLACEMENTS, Anatomy, Resume, Sublayer, UnsupportedMethod, anatomy, register_anatomy,
                      sdpa_with_prefix)
from .families import ASTAnatomy, DecoderAnatomy, EncoderAnatomy, SwinAnatomy, ViTAnatomy, square_grid

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
# Loaders that live in domain packages, imported on first use.
LAZY = {"ast": "audio.backbone", "dinov2": "medical.backbone", "bird-mae": "audio.birds.birdmae",
        "tiny-bird-mae": "audio.birds.birdmae", "swin-t": "vision.backbone",
        "hf-encoder": "text.backbone", "hf-causal-lm": "text.backbone", "tiny-llama-lm": "text.backbone",
        "whisper": "audio.whisper", "tiny-whisper": "audio.whisper"}


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Every generator a constructor may draw from (torch's CPU and device generators, numpy's and
    Python's global ones) seeded with `seed` inside, and restored to the caller's state after."""
    import numpy as np

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def seeded_build(fn: Callable[..., nn.Module], seed: int = 0, **kw) -> nn.Module:
    """`fn(**kw)` with every generator seeded (`seeded_rng`): the same weights in any process.

    A constructor may import modules on its first call (a library's lazily loaded submodule, a
    family registered on first use), between our seeding and its parameter init; an import that
    draws from or reseeds a generator would make the weights depend on what the process had
    imported before (a fresh interpreter vs. one that had run other code). So a build during which
    anything was imported is thrown away and repeated: by then every import has happened, and the
    second build draws only what the constructor itself draws."""
    for _ in range(2):
        before = set(sys.modules)
        with seeded_rng(seed):
            model = fn(**kw)
        if set(sys.modules) <= before:
            break
    return model


def register_backbone(name: str, seeded: bool = False):
    """Register a constructor. `seeded` ones take `seed=` and build the same weights every time
    (`seeded_build`), so a bundle trained on a random test model can be loaded into a rebuilt one."""
    def deco(fn):
        if seeded:
            @functools.wraps(fn)
            def build(seed: int = 0, **kw):
                return seeded_build(fn, seed, **kw)
            build.seeded = True
            BACKBONES[name] = build
        else:
            BACKBONES[name] = fn
        return fn
    return deco


LIBRARIES = ("torch", "timm", "transformers", "numpy")  # the ones whose code draws a random backbone's weights


def build_record(seed: int | None = None) -> dict[str, Any]:
    """What besides id and kwargs decides a seeded backbone's weights: the seed, the versions of the
    libraries that draw them, and torch's CPU kernel set (its vectorised normal_ / erfinv give other
    bits on AVX2 / AVX512 / no-SIMD CPUs for the same seed), plus the default dtype."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = version(lib)
        except PackageNotFoundError:
            versions[lib] = None
    return {"seed": seed, "versions": versions, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "default_dtype": str(torch.get_default_dtype()).removeprefix("torch.")}


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone (`tiny-vit`, `ast`, ...) by name."""
    if name not in BACKBONES and name in LAZY:
        importlib.import_module(LAZY[name])
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(sorted(set(BACKBONES) | set(LAZY)))}")
    fn = BACKBONES[name]
    model = fn(**kwargs)
    # Remember how it was built, so a saved bundle can rebuild it (`shared.peft.from_bundle`) and a
    # fingerprint mismatch can say what differs (`describe_mismatch`).
    seed = int(kwargs.get("seed", 0)) if getattr(fn, "seeded", False) else None
    model.registry_source = {"id": name, "kwargs": dict(kwargs), "build": build_record(seed)}
    return model


def describe_mismatch(recorded: dict[str, Any], backbone: nn.Module) -> str:
    """Why a backbone's weights may differ from those a bundle was trained on: its `backbone`
    record (id, kwargs, build: seed / library versions / CPU kernels) against how `backbone` was
    built here, as "what: recorded vs now" clauses."""
    source = getattr(backbone, "registry_source", None)
    if not source:
        return ("the given backbone was not built by shared.backbones.create, so nothing records how; "
                "build it with the bundle's backbone id and kwargs")
    then, now = recorded.get("build"), source.get("build") or {}
    diffs = []
    if recorded.get("id") != source.get("id"):
        diffs.append(f"backbone id {recorded.get('id')!r} vs {source.get('id')!r}")
    kw_then, kw_now = ({k: v for k, v in (d or {}).items() if k != "seed"}  # the seed has its own clause
                       for d in (recorded.get("kwargs"), source.get("kwargs")))
    if kw_then != kw_now:
        diffs.append(f"kwargs {kw_then} vs {kw_now}")
    if not then:
        return ("recorded vs now: " + "; ".join(diffs) + "; " if diffs else "") + \
            "the bundle records no seed or library versions (saved by an older peft-suite)"
    if then.get("seed") != now.get("seed"):
        diffs.append(f"seed {then.get('seed')} vs {now.get('seed')}")
    old_v, new_v = then.get("versions") or {}, now.get("versions") or {}
    diffs += [f"{lib} {old_v.get(lib)} vs {new_v.get(lib)}" for lib in sorted(set(old_v) | set(new_v))
              if old_v.get(lib) != new_v.get(lib)]
    for key, what in (("cpu_capability", "CPU kernels"), ("default_dtype", "default dtype")):
        if then.get(key) != now.get(key):
            diffs.append(f"{what} {then.get(key)} vs {now.get(key)}")
    if not diffs:
        return ("id, kwargs, seed, library versions and CPU kernels all match the bundle's record, so the weights "
                "were changed after they were built (a loaded checkpoint, an edit) or come from another source")
    return "recorded vs now: " + "; ".join(diffs)


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
    "PLACEMENTS", "Anatomy", "Resume", "Sublayer", "UnsupportedMethod", "anatomy", "register_anatomy",
    "sdpa_with_prefix", "square_grid", "ASTAnatomy", "DecoderAnatomy", "EncoderAnatomy",
    "SwinAnatomy", "ViTAnatomy", "BACKBONES", "register_backbone", "create", "seeded_rng", "seeded_build",
    "build_record", "describe_mismatch",
]
