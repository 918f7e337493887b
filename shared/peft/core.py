"""attach / summary / merge: the verbs of the PEFT core."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import types
from typing import Any, Iterable

import torch
import torch.utils.checkpoint
from torch import nn

from shared.backbones import Anatomy, Resume, anatomy

from .base import Method, PeftState, from_dict, state_of
from .hyper import active_task, use_task


class Classifier(nn.Module):
    """A backbone (with its PEFT methods) and a head reading the backbone's tokens."""

    def __init__(self, backbone: nn.Module, head: nn.Module, labels: list[str] | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.labels = list(labels) if labels else None
        self.anatomy = anatomy(backbone)

    def tokens(self, inputs):
        if isinstance(inputs, Resume):  # cached block inputs (shared.depth_cache): the blocks from there on
            return self.anatomy.forward_from(inputs)
        return self.anatomy.forward_tokens(inputs)

    def forward(self, inputs) -> torch.Tensor:
        return self.head(self.tokens(inputs))  # (B, C)


def split(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(backbone, head) of a Classifier; (its backbone, None) for other wrappers with an attached
    `.backbone` (e.g. a segmenter); else (model, None)."""
    if isinstance(model, Classifier):
        return model.backbone, model.head
    inner = getattr(model, "backbone", None)
    if getattr(model, "peft_state", None) is None and getattr(inner, "peft_state", None) is not None:
        return inner, None
    return model, None


def fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes and values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.device.type != "meta":
            h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weightless_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers live on the meta device (no memory for weights)."""
    memo = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def attach(backbone: nn.Module, methods: Iterable[Method | dict[str, Any]], backbone_id: str | None = None,
           compute_fingerprint: bool = True, validate: bool = True) -> nn.Module:
    """Attach PEFT methods to `backbone` in place and freeze everything they do not train.

    Methods compose; Hugging Face peft methods are injected first so that hook-based methods
    wrap the peft layers. Returns the same module, with `backbone.peft_state` recording what was
    attached. Calling attach again adds more methods.

    Refused means untouched: every method is first attached to a weightless copy of the model,
    so a method that does not fit raises before the backbone is modified.
    """
    methods = [from_dict(m) if isinstance(m, dict) else m for m in methods]
    for m in methods:
        if not isinstance(m, Method):
            raise TypeError(f"expected a method config or dict, got {type(m).__name__}")
    anat = anatomy(backbone)
    if validate and methods:
        attach(weightless_copy(backbone), methods, backbone_id=backbone_id, compute_fingerprint=False, validate=False)
    state: PeftState | None = getattr(backbone, "peft_state", None)
    if state is None:
        source = getattr(backbone, "registry_source", None) or {}
        state = PeftState(fingerprint=fingerprint(backbone) if compute_fingerprint else "",
                          backbone_id=backbone_id or source.get("id") or anat.fingerprint_id())
    if state.merged:
        raise ValueError("cannot attach methods to a merged model; attach to a fresh backbone")
    params = dict(backbone.named_parameters())
    owner_ids = {id(params[n]): k for n, k in state.owner.items() if n in params}
    buffer_ids = {id(b) for b in backbone.buffers()}
    used = {k for k, _ in state.methods}
    for m in sorted(methods, key=lambda m: not m.from_hf_peft):
        key = _unique_key(m.name, used)
        before = {id(p) for p in backbone.parameters()}
        existing = {id(p) for p in m.attach(backbone, anat, key)}
        for p in backbone.parameters():
            new = id(p) not in before
            if (new and not m.from_hf_peft) or id(p) in existing:
                owner_ids.setdefault(id(p), key)
        state.methods.append((key, m))
    for p in backbone.parameters():
        p.requires_grad_(id(p) in owner_ids)
    state.owner = {n: owner_ids[id(p)] for n, p in backbone.named_parameters() if id(p) in owner_ids}
    state.buffers = sorted({n for n, b in backbone.named_buffers() if id(b) not in buffer_ids} | set(state.buffers))
    backbone.peft_state = state
    backbone.train(backbone.training)  # new modules follow the model's mode (an eval model stays eval)
    return backbone


def _unique_key(name: str, used: set[str]) -> str:
    key, i = name, 2
    while key in used:
        key, i = f"{name}_{i}", i + 1
    used.add(key)
    return key


def summary(model: nn.Module) -> dict[str, Any]:
    """{"trainable", "total", "by_method": {method key: trainable count}} (+ "head")."""
    backbone, head = split(model)
    state = state_of(backbone)
    params = dict(backbone.named_parameters())
    by_method = {k: 0 for k, _ in state.methods}
    for name, key in state.owner.items():
        if name in params:
            by_method[key] += params[name].numel()
    if head is not None:
        by_method["head"] = sum(p.numel() for p in head.parameters())
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "by_method": by_method,
            "trainable_percent": 100.0 * trainable / max(total, 1)}


def merge(model: nn.Module) -> dict[str, str]:
    """Fold every method that can be folded into the backbone weights; outputs are unchanged.

    Returns {method key: "merged" or the reason it stays attached}.
    """
    backbone, _ = split(model)
    state = state_of(backbone)
    anat: Anatomy = anatomy(backbone)
    report = {}
    pending = [(key, m) for key, m in state.methods if key not in state.merged]
    for key, m in sorted(pending, key=lambda km: km[1].merge_phase(backbone, anat, km[0])):  # stable
        why = m.merge(backbone, anat, key)
        report[key] = why or "merged"
        if why is None:
            state.merged.append(key)
    report = {key: report.get(key, "merged") for key, _ in state.methods}
    params = set(n for n, _ in backbone.named_parameters())
    state.owner = {n: k for n, k in state.owner.items() if n in params}
    return report


def _recomputed_forward(self, *args, **kwargs):
    """A block's forward under activation checkpointing: its activations are recomputed in the
    backward instead of kept. Hooks inside the block (adapters, LoRA, prefixes) run again in the
    recomputation, with the same dropout masks (checkpoint restores the RNG state) and the same
    hypernetwork task (`use_task` is re-entered for the recomputation, which runs in the backward)."""
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    task = active_task()
    if task is None:
        return torch.utils.checkpoint.checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, self, *args, use_reentrant=False,
                                             context_fn=lambda: (contextlib.nullcontext(), use_task(task)), **kwargs)


def recompute(model: nn.Module, enabled: bool = True) -> int:
    """Turn activation recomputation (checkpointing) on or off for every block of the backbone.

    Trades one extra forward of each block in the backward for not keeping its activations;
    works with every method, since they all live inside the blocks or as hooks on them. Returns
    the number of blocks changed. A transformers model's KV cache is switched off
    (`config.use_cache = False`, as transformers' own gradient checkpointing does): a block re-run in
    the backward would otherwise append its keys and values to the cache a second time.
    """
    backbone, _ = split(model)
    config = getattr(backbone, "config", None)
    if enabled and getattr(config, "use_cache", False):
        config.use_cache = False
    n = 0
    for block in anatomy(backbone).blocks():
        on = block.__dict__.get("forward") is not None and getattr(block.forward, "__func__", None) is _recomputed_forward
        if enabled and not on:
            if "forward" in block.__dict__:
                raise ValueError(f"{type(block).__name__} already has its own forward override; cannot recompute it")
            block.forward = types.MethodType(_recomputed_forward, block)
            n += 1
        elif not enabled and on:
            del block.forward
            n += 1
    return n


def start(model: nn.Module, total_steps: int) -> None:
    """Tell methods that schedule over the run (AdaLoRA) how many optimiser steps it has."""
    backbone, _ = split(model)
    for key, m in state_of(backbone).methods:
        m.start(backbone, key, total_steps)


def step(model: nn.Module, global_step: int) -> None:
    """Let methods that adapt during training (AdaLoRA's rank allocation) act after an optimiser step."""
    backbone, _ = split(model)
    for key, m in state_of(backbone).methods:
        m.step(backbone, key, global_step)


def regularization(model: nn.Module):
    """The sum of the methods' extra training losses (e.g. AdaLoRA's orthogonality), or None."""
    backbone, _ = split(model)
    terms = [t for key, m in state_of(backbone).methods if (t := m.regularization(backbone, key)) is not None]
    return sum(terms) if terms else None
