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
    """Learned tokens inserted after the kept prefix tokens (CLS, distillation, registers).

    Shallow: inserted before the first block and carried through. Deep: at every later block
    the previous block's prompt outputs are replaced by that block's own prompts.

    `offset` is the backbone's number of prefix tokens; `keep` of them (the first ones) stay in
    the sequence and the rest are dropped before the first block (PETL-AST keeps CLS and drops
    AST's distillation token: keep=1). With `keep_outputs` False the prompt positions are
    removed after the last block, so the backbone's output has its usual layout (minus any
    dropped prefix tokens); with True the last block's prompt outputs stay in the sequence,
    between the kept prefix and the patches, where a head's "mean" pooling averages over them.
    """

    def __init__(self, n_blocks: int, n_tokens: int, dim: int, offset: int, deep: bool, *,
                 keep: int | None = None, keep_outputs: bool = False, init: str = "trunc_normal",
                 bound: float | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
        super().__init__()
        self.n, self.offset, self.deep = n_tokens, offset, deep
        self.keep = offset if keep is None else keep
        self.keep_outputs = keep_outputs
        # Drawn in fp32 on the CPU, then moved: the same values for every backbone dtype / device.
        t = torch.empty(n_blocks if deep else 1, n_tokens, dim)
        if init == "vpt_uniform":
            nn.init.uniform_(t, -bound, bound)
        else:
            nn.init.trunc_normal_(t, std=0.02)
        self.tokens = nn.Parameter(t.to(dtype=dtype, device=device))

    def install(self, blocks: list[nn.Module]) -> None:
        blocks[0].register_forward_pre_hook(self._insert)
        if self.deep:
            for i, block in enumerate(blocks[1:], start=1):
                block.register_forward_pre_hook(functools.partial(self._replace, i))
        if not self.keep_outputs:
            blocks[-1].register_forward_hook(self._strip)

    def _insert(self, module, args):
        x = args[0]  # (B, offset + N, D) -> (B, keep + n + N, D)
        p = self.tokens[0].to(x.dtype).expand(x.shape[0], -1, -1)
        return (torch.cat([x[:, :self.keep], p, x[:, self.offset:]], dim=1), *args[1:])

    def _replace(self, i: int, module, args):
        x = args[0]
        p = self.tokens[i].to(x.dtype).expand(x.shape[0], -1, -1)
        k = self.keep
        return (torch.cat([x[:, :k], p, x[:, k + self.n:]], dim=1), *args[1:])

    def _strip(self, module, args, out):
        k = self.keep
        if isinstance(out, tuple):
            return (torch.cat([out[0][:, :k], out[0][:, k + self.n:]], dim=1), *out[1:])
        return torch.cat([out[:, :k], out[:, k + self.n:]], dim=1)


PROMPT_INITS = ("trunc_normal", "vpt_uniform")


def patch_size(model: nn.Module, who: str) -> tuple[int, int]:
    """Kernel of the patch-embedding convolution (the first Conv2d named *patch_embed*)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and "patch_embed" in name:
            return tuple(m.kernel_size)
    raise ValueError(f"{who}: init='vpt_uniform' needs the patch size, but the backbone has no Conv2d "
                     "patch embedding (a module named '*patch_embed*'); use init='trunc_normal'")


def vpt_bound(model: nn.Module, dim: int, who: str) -> float:
    """VPT's xavier-style bound sqrt(6 / (3 * p_h * p_w + D)) (3: VPT's RGB channels)."""
    ph, pw = patch_size(model, who)
    return (6.0 / (3 * ph * pw + dim)) ** 0.5


@register
@dataclass(frozen=True)
class Prompt(Method):
    """Visual / audio prompt tuning (Jia et al. 2022): learned tokens prepended to the patches.

    Defaults (ours, for any ViT-style backbone): prompts initialised N(0, 0.02^2) like timm's
    CLS / register tokens, every pretrained prefix token kept, prompt outputs removed after the
    last block so that heads see the backbone's usual layout. PETL-AST's recipe
    (`domains/audio/methods/prompt.yaml`) instead sets:

    - `init="vpt_uniform"`: U(-a, a) with a = sqrt(6 / (3 * p_h * p_w + D)) (VPT's xavier-style
      bound; p = the patch-embedding kernel, 3 = VPT's RGB channels, kept by PETL-AST for the
      1-channel AST: 16x16, D 768 -> a = 0.0625);
    - `keep_prefix=1`: keep CLS, drop AST's distillation token from the sequence (it then takes
      no part in attention; it is not just left out of pooling);
    - `keep_outputs=True`: the prompt outputs stay in the output sequence as non-patch tokens,
      so `pool: mean` averages over CLS, prompts and patches (PETL-AST's "ALL").
    """

    name: ClassVar[str] = "prompt"
    n_tokens: int = 25
    deep: bool = True
    init: str = "trunc_normal"
    keep_prefix: int | None = None
    keep_outputs: bool = False

    def __post_init__(self):
        check_positive("n_tokens", self.n_tokens)
        if self.init not in PROMPT_INITS:
            raise ValueError(f"prompt: init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.keep_prefix is not None and (isinstance(self.keep_prefix, bool) or not isinstance(self.keep_prefix, int)
                                             or self.keep_prefix < 0):
            raise ValueError(f"prompt: keep_prefix must be None or an integer >= 0, got {self.keep_prefix!r}")

    @staticmethod
    def patch_size(model: nn.Module) -> tuple[int, int]:
        return patch_size(model, "prompt")

    def vpt_bound(self, model: nn.Module, dim: int) -> float:
        return vpt_bound(model, dim, "prompt")

    def attach(self, model, anat, key):
        blocks = anat.token_blocks()  # raises UnsupportedMethod with the reason
        n_prefix = anat.num_prefix_tokens
        if self.keep_prefix is not None and self.keep_prefix > n_prefix:
            raise ValueError(f"prompt: keep_prefix={self.keep_prefix} but the backbone has only {n_prefix} "
                             "prefix tokens")
        bound = self.vpt_bound(model, anat.embed_dim) if self.init == "vpt_uniform" else None
        ref = next((p for p in blocks[0].parameters() if p.is_floating_point()), None)
        mod = PromptTokens(len(blocks), self.n_tokens, anat.embed_dim, n_prefix, self.deep,
                           keep=self.keep_prefix, keep_outputs=self.keep_outputs, init=self.init, bound=bound,
                           dtype=None if ref is None else ref.dtype, device=None if ref is None else ref.device)
        model.add_module(f"peft_{key}", mod)
        mod.install(blocks)
        return ()


class PrefixKV(nn.Module):
    """Per-block learned key and value prefixes, (H, P, hd) each."""

    def __init__(self, heads: int, n_tokens: int, head_dim: int, bound: float | None = None):
        super().__init__()
        self.key = nn.Parameter(torch.empty(heads, n_tokens, head_dim))
        self.value = nn.Parameter(torch.empty(heads, n_tokens, head_dim))
        for p in (self.key, self.value):
            if bound is None:
                nn.init.trunc_normal_(p, std=0.02)
            else:
                nn.init.uniform_(p, -bound, bound)


def _prefix_forward(attn: nn.Module, *args, **kwargs):
    """Replacement forward of an attention module with prefixes; the anatomy does the projections."""
    # the token sequence comes first, or by keyword (WhisperEncoderLayer calls self_attn(hidden_states=...))
    x, args = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
    anat_cls, kv = attn.peft_prefix_anatomy, getattr(attn, attn.peft_prefix_name)
    q, k, v = anat_cls.qkv(attn, x)  # (B, H, N, hd)
    drop = anat_cls.attention_dropout(attn) if attn.training else 0.0
    ctx = sdpa_with_prefix(q, k, v, kv.key, kv.value, dropout_p=drop)
    ctx = ctx.transpose(1, 2).reshape(*x.shape[:-1], -1)  # (B, N, H*hd)
    return anat_cls.attention_output(attn, ctx, (x, *args))


@register
@dataclass(frozen=True)
class Prefix(Method):
    """Prefix tuning (Li & Liang 2021) for ViT-style attention: n learned keys and n values per block.

    PETL-AST's "24 prefix tokens" are n_tokens=12 (12 keys + 12 values), initialised like its
    prompts (`init="vpt_uniform"`, see `Prompt`); the default is N(0, 0.02^2).
    """

    name: ClassVar[str] = "prefix"
    n_tokens: int = 12
    init: str = "trunc_normal"

    def __post_init__(self):
        check_positive("n_tokens", self.n_tokens)
        if self.init not in PROMPT_INITS:
            raise ValueError(f"prefix: init must be one of {PROMPT_INITS}, got {self.init!r}")

    def attach(self, model, anat, key):
        bound = vpt_bound(model, anat.embed_dim, "prefix") if self.init == "vpt_uniform" else None
        for block in anat.blocks():
            attn = anat.attention(block)  # raises UnsupportedMethod with the reason
            heads = anat.attention_heads(attn)
            head_dim = getattr(attn, "head_dim")
            if hasattr(attn, "peft_prefix_name"):
                raise ValueError("prefix: this attention already has a prefix method attached")
            ref = next(attn.parameters())
            kv = PrefixKV(heads, self.n_tokens, head_dim, bound).to(device=ref.device, dtype=ref.dtype)
            attn.add_module(f"peft_{key}", kv)
            attn.peft_prefix_name, attn.peft_prefix_anatomy = f"peft_{key}", type(anat)
            attn.forward = types.MethodType(_prefix_forward, attn)
        return ()
