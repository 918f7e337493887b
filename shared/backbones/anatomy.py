"""Backbone anatomies: where a model keeps its blocks, sublayers, norms and tokens.

PEFT methods never reach into model internals; they ask an `Anatomy`. Supporting a new
backbone family means writing one `Anatomy` subclass and registering the model class it
recognises with `@register_anatomy(...)`.

Vocabulary used by every method:
- block: one transformer layer, in forward order;
- sublayer ("mhsa" or "ffn") of a block, described by a `Sublayer`:
    entry  - a module whose first positional input is the sublayer's input
             (after its pre-norm in pre-LN models);
    exit   - the sublayer's last `nn.Linear` (its weights are where affine methods fold);
    out    - the module whose output the residual add receives, when it is not `exit`: DINOv2's
             LayerScale (`ls1` / `ls2`, or the Identity standing in for it). Methods add their
             delta there: after every per-sublayer scale, before drop-path;
    norm   - the LayerNorm that belongs to the sublayer (pre-norm, or post-norm in BERT);
- tokens: the (B, N, D) sequence that flows between blocks, `num_prefix` leading
  non-patch tokens (CLS, distillation, registers) and the patch grid.

Resuming at a block (depth caching, `shared.depth_cache`): `tokens_entering(k, inputs)` runs the
backbone's own forward up to block k and returns the tokens entering it as a `Resume`;
`forward_from(resume)` runs blocks k.. (the same modules, so every method's hooks fire), the final
norm, and returns the `Tokens` that `forward_tokens` would have.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.heads import Tokens

PLACEMENTS = ("mhsa", "ffn")


@dataclass(frozen=True)
class Sublayer:
    entry: nn.Module
    exit: nn.Linear
    norm: nn.Module | None
    dim: int  # width of the residual stream at this sublayer
    out: nn.Module | None = None  # see the module docstring; None: the exit layer's output

    @property
    def output(self) -> nn.Module:
        """The module whose output is the sublayer's output as the residual add receives it."""
        return self.exit if self.out is None else self.out


class UnsupportedMethod(ValueError):
    """A method cannot be attached to this backbone family (the message says why)."""


@dataclass
class Resume:
    """The tokens entering block `block` of a backbone, standing in for the input batch they came from.

    `Anatomy.forward_from(resume)` (and `shared.peft.Classifier`, given one in place of inputs) runs the
    backbone on from that block. tokens: (B, N, D) (Swin: (B, H, W, C)), any float dtype (cast to the
    blocks' dtype); mask: (B, N) attention mask of text encoders (1 real, 0 padding), else None; grid:
    the input's patch grid where only the input knows it (timm ViT); input_ndim: the `ndim` of the
    input batch, so code that branches on it (2D images vs 3D volumes) takes the same branch.
    """

    block: int
    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    input_ndim: int | None = None

    @property
    def ndim(self) -> int | None:
        return self.input_ndim

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, *args, **kwargs) -> "Resume":
        """Moved to a device like a batch of tensors (Lightning's transfer_batch_to_device calls this);
        dtypes are kept (the mask stays integer, the tokens keep their storage dtype)."""
        device = kwargs.pop("device", args[0] if args else None)
        if isinstance(device, torch.dtype):
            raise TypeError("Resume.to moves devices only; forward_from casts the tokens to the blocks' dtype")
        nb = bool(kwargs.get("non_blocking", False))
        move = (lambda t: t if t is None else t.to(device, non_blocking=nb))
        return Resume(self.block, move(self.tokens), move(self.mask), self.grid, self.input_ndim)


class _Reached(Exception):
    """Raised by the hook of `tokens_entering` to stop the forward at the block it wanted."""


class Anatomy(abc.ABC):
    """Base class. Subclasses fill in the family-specific parts."""

    family = "abstract"
    model_classes: tuple[type, ...] = ()
    # Why prompts / prefixes cannot be used (None when they can).
    prompt_unsupported: str | None = None
    prefix_unsupported: str | None = None

    def __init__(self, model: nn.Module):
        self.model = model

    # --- structure -----------------------------------------------------------------------
    @abc.abstractmethod
    def blocks(self) -> list[nn.Module]:
        """Transformer blocks in forward order."""

    @abc.abstractmethod
    def sublayer(self, block: nn.Module, placement: str) -> Sublayer:
        """The "mhsa" or "ffn" sublayer of `block`."""

    def final_norm(self) -> nn.Module | None:
        return None

    def norms(self) -> list[nn.Module]:
        """Every normalisation layer (LayerNorm, RMSNorm, BatchNorm, GroupNorm)."""
        return [m for m in self.model.modules() if _is_norm(m)]

    @property
    def embed_dim(self) -> int:
        return self.sublayer(self.blocks()[0], "ffn").dim

    # --- tokens --------------------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        return 0

    def grid(self) -> tuple[int, int] | None:
        return None

    def token_blocks(self) -> list[nn.Module]:
        """Blocks whose first input is the (B, N, D) token sequence (prompt insertion points)."""
        if self.prompt_unsupported:
            raise UnsupportedMethod(self.prompt_unsupported)
        return self.blocks()

    # --- attention internals, for prefix tuning -------------------------------------------
    def attention(self, block: nn.Module) -> nn.Module:
        raise UnsupportedMethod(self.prefix_unsupported or f"{self.family}: no attention access")

    def attention_heads(self, attn: nn.Module) -> int:
        raise UnsupportedMethod(self.prefix_unsupported or f"{self.family}: no attention access")

    def qkv(self, attn: nn.Module, x: torch.Tensor):
        """Project (B, N, D) to q, k, v each (B, H, N, hd)."""
        raise UnsupportedMethod(self.prefix_unsupported or f"{self.family}: no attention access")

    @staticmethod
    def attention_dropout(attn: nn.Module) -> float:
        """The attention-probability dropout the module applies while training."""
        return 0.0

    def attention_output(self, attn: nn.Module, ctx: torch.Tensor, inputs: tuple):
        """Project the attention context (B, N, H*hd) and return what the module returns."""
        raise UnsupportedMethod(self.prefix_unsupported or f"{self.family}: no attention access")

    # --- features ------------------------------------------------------------------------
    @abc.abstractmethod
    def forward_tokens(self, inputs) -> Tokens:
        """Run the backbone; return tokens after its final norm."""

    # --- resuming at a block (depth caching) ------------------------------------------------
    def resume_unsupported(self) -> str | None:
        """Why `forward_from` is not available on this backbone (None where it is)."""
        return (f"{self.family}: resuming the forward at a block (forward_from) is not implemented for this "
                f"backbone family")

    def resume_context(self, inputs) -> dict:
        """What `forward_from` needs besides the tokens, read from the inputs (`Resume` fields)."""
        return {}

    def tokens_entering(self, index: int, inputs) -> Resume:
        """The tokens entering block `index` (what its first forward pre-hook would receive, before
        any method's hook on it), from the backbone's own forward stopped there; index ==
        len(blocks): the last block's output, before the final norm. The caller picks grad mode
        and train / eval mode."""
        why = self.resume_unsupported()
        if why:
            raise UnsupportedMethod(why)
        blocks = self.blocks()
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= len(blocks):
            raise ValueError(f"block index {index!r} out of range 0..{len(blocks)} ({len(blocks)} blocks)")
        box: dict = {}
        if index < len(blocks):
            def grab(module, args, kwargs):
                box["x"] = args[0] if args else kwargs["hidden_states"]
                raise _Reached
            handle = blocks[index].register_forward_pre_hook(grab, prepend=True, with_kwargs=True)
        else:
            def grab(module, args, out):
                box["x"] = out[0] if isinstance(out, tuple) else out
                raise _Reached
            handle = blocks[-1].register_forward_hook(grab)  # after every other hook on it
        try:
            self.forward_tokens(inputs)
        except _Reached:
            pass
        finally:
            handle.remove()
        if "x" not in box:
            raise RuntimeError(f"{self.family}: the forward never reached block {index}")
        ndim = getattr(inputs, "ndim", None)
        return Resume(index, box["x"], input_ndim=ndim, **self.resume_context(inputs))

    def forward_from(self, resume: Resume) -> Tokens:
        """Run blocks `resume.block`.. and the final norm on `resume.tokens`; the `Tokens` that
        `forward_tokens` gives for the inputs the tokens came from."""
        raise UnsupportedMethod(self.resume_unsupported() or f"{self.family}: no forward_from")

    def _resume_input(self, resume: Resume) -> torch.Tensor:
        """The cached tokens in the blocks' dtype, checked against the number of blocks."""
        blocks = self.blocks()
        if not 0 <= resume.block <= len(blocks):
            raise ValueError(f"Resume.block {resume.block} out of range 0..{len(blocks)} ({len(blocks)} blocks)")
        ref = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return resume.tokens if ref is None else resume.tokens.to(ref.dtype)

    def fingerprint_id(self) -> str:
        """A human-readable backbone id (checkpoint name or architecture)."""
        cfg = getattr(self.model, "config", None)
        name = getattr(cfg, "name_or_path", "") if cfg is not None else ""
        if not name:
            pcfg = getattr(self.model, "pretrained_cfg", None) or {}
            name = pcfg.get("hf_hub_id") or pcfg.get("architecture") or ""
        return name or type(self.model).__name__


def _is_norm(m: nn.Module) -> bool:
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
        return True
    return type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


_REGISTRY: list[type[Anatomy]] = []


def register_anatomy(cls: type[Anatomy]) -> type[Anatomy]:
    _REGISTRY.append(cls)
    return cls


def anatomy(model: nn.Module) -> Anatomy:
    """The anatomy of `model` (its most specific registered class wins)."""
    for cls in _REGISTRY:
        if cls.model_classes and isinstance(model, cls.model_classes):
            return cls(model)
    known = ", ".join(c.model_classes[0].__name__ for c in _REGISTRY if c.model_classes)
    raise TypeError(f"no anatomy for {type(model).__name__}; supported backbone classes: {known}")


def sdpa_with_prefix(q, k, v, prefix_k, prefix_v, dropout_p: float = 0.0):
    """Attention where learned key/value prefixes (H, P, hd) join every sequence's keys."""
    B = q.shape[0]
    k = torch.cat([prefix_k.unsqueeze(0).expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
    v = torch.cat([prefix_v.unsqueeze(0).expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, H, N, hd)

