"""Methods that add learned tokens: prompt tuning (shallow / deep) and prefix tuning."""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from shared.backbones import sdpa_with_prefix

from .base import Method, check_positive, register


class PromptTokens(nn.Module):
    """Learned tokens inserted after the prefix tokens (CLS, distillation, registers).

    Shallow: inserted before the first block and carried through. Deep: at every later block
    the previous block's prompt outputs are replaced by that block's own prompts. The prompt
    positions are removed after the last block, so the backbone's output keeps its shape.
    """

    def __init__(self, n_blocks: int, n_tokens: int, dim: int, offset: int, deep: bool):
        super().__init__()
        self.n, self.offset, self.deep = n_tokens, offset, deep
        self.tokens = nn.Parameter(torch.empty(n_blocks if deep else 1, n_tokens, dim))
        nn.init.trunc_normal_(self.tokens, std=0.02)

    def install(self, blocks: list[nn.Module]) -> None:
        blocks[0].register_forward_pre_hook(self._insert)
        if self.deep:
            for i, block in enumerate(blocks[1:], start=1):
                block.register_forward_pre_hook(functools.partial(self._replace, i))
        blocks[-1].register_forward_hook(self._strip)

    def _insert(self, module, args):
        x = args[0]  # (B, N, D)
        p = self.tokens[0].to(x.dtype).expand(x.shape[0], -1, -1)
        o = self.offset
        return (torch.cat([x[:, :o], p, x[:, o:]], dim=1), *args[1:])

    def _replace(self, i: int, module, args):
        x = args[0]
        p = self.tokens[i].to(x.dtype).expand(x.shape[0], -1, -1)
        o = self.offset
        return (torch.cat([x[:, :o], p, x[:, o + self.n:]], dim=1), *args[1:])

    def _strip(self, module, args, out):
        o = self.offset
        if isinstance(out, tuple):
            return (torch.cat([out[0][:, :o], out[0][:, o + self.n:]], dim=1), *out[1:])
        return torch.cat([out[:, :o], out[:, o + self.n:]], dim=1)


@register
@dataclass(frozen=True)
class Prompt(Method):
    """Visual / audio prompt tuning (Jia et al. 2022): learned tokens prepended to the patches."""

    name: ClassVar[str] = "prompt"
    n_tokens: int = 25
    deep: bool = True

    def __post_init__(self):
        check_positive("n_tokens", self.n_tokens)

    def attach(self, model, anat, key):
        blocks = anat.token_blocks()  # raises UnsupportedMethod with the reason
        mod = PromptTokens(len(blocks), self.n_tokens, anat.embed_dim, anat.num_prefix_tokens, self.deep)
        model.add_module(f"peft_{key}", mod)
        mod.install(blocks)
        return ()


class PrefixKV(nn.Module):
    """Per-block learned key and value prefixes, (H, P, hd) each."""

    def __init__(self, heads: int, n_tokens: int, head_dim: int):
        super().__init__()
        self.key = nn.Parameter(torch.empty(heads, n_tokens, head_dim))
        self.value = nn.Parameter(torch.empty(heads, n_tokens, head_dim))
        for p in (self.key, self.value):
            nn.init.trunc_normal_(p, std=0.02)


def _prefix_forward(attn: nn.Module, x: torch.Tensor, *args, **kwargs):
    """Replacement forward of an attention module with prefixes; the anatomy does the projections."""
    anat_cls, kv = attn.peft_prefix_anatomy, getattr(attn, attn.peft_prefix_name)
    q, k, v = anat_cls.qkv(attn, x)  # (B, H, N, hd)
    p = getattr(attn, "attn_drop", None)
    drop = p.p if (attn.training and isinstance(p, nn.Dropout)) else 0.0
    ctx = sdpa_with_prefix(q, k, v, kv.key, kv.value, dropout_p=drop)
    ctx = ctx.transpose(1, 2).reshape(*x.shape[:-1], -1)  # (B, N, H*hd)
    return anat_cls.attention_output(attn, ctx, (x, *args))


@register
@dataclass(frozen=True)
class Prefix(Method):
    """Prefix tuning (Li & Liang 2021) for ViT-style attention: n learned keys and n values per block.

    PETL-AST's "24 prefix tokens" are n_tokens=12 (12 keys + 12 values).
    """

    name: ClassVar[str] = "prefix"
    n_tokens: int = 12

    def __post_init__(self):
        check_positive("n_tokens", self.n_tokens)

    def attach(self, model, anat, key):
        for block in anat.blocks():
            attn = anat.attention(block)  # raises UnsupportedMethod with the reason
            heads = anat.attention_heads(attn)
            head_dim = getattr(attn, "head_dim")
            if hasattr(attn, "peft_prefix_name"):
                raise ValueError("prefix: this attention already has a prefix method attached")
            attn.add_module(f"peft_{key}", PrefixKV(heads, self.n_tokens, head_dim))
            attn.peft_prefix_name, attn.peft_prefix_anatomy = f"peft_{key}", type(anat)
            attn.forward = types.MethodType(_prefix_forward, attn)
        return ()
