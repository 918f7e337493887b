"""Methods that train a chosen subset of the backbone's own parameters: BitFit, norm tuning."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from shared.backbones.anatomy import _is_norm

from .base import Method, register


@register
@dataclass(frozen=True)
class BitFit(Method):
    """Train only biases (Ben Zaken et al. 2022): of Linear and conv layers, and of norms
    when `include_norms` (PETL-AST trains the Linear and LayerNorm biases)."""

    name: ClassVar[str] = "bitfit"
    include_norms: bool = True

    def attach(self, model, anat, key):
        kinds = (nn.Linear, nn.modules.conv._ConvNd)
        out = []
        for m in model.modules():
            if isinstance(m, kinds) or (self.include_norms and _is_norm(m)):
                b = getattr(m, "bias", None)
                if isinstance(b, nn.Parameter):
                    out.append(b)
        if not out:
            raise ValueError(f"bitfit: {type(model).__name__} has no bias parameters")
        return out

    def merge(self, model, anat, key):
        return None  # the trained biases are the backbone's own weights


@register
@dataclass(frozen=True)
class NormTuning(Method):
    """Train only the affine parameters of every normalisation layer (LayerNorm, RMSNorm, ...).

    `final_only`: just the backbone's final norm (PETL-AST's linear probe trains it with the head).
    """

    name: ClassVar[str] = "norm_tuning"
    final_only: bool = False

    def attach(self, model, anat, key):
        norms = [anat.final_norm()] if self.final_only else anat.norms()
        out = [p for m in norms if m is not None for p in m.parameters(recurse=False)]
        if not out:
            raise ValueError(f"norm_tuning: {type(model).__name__} has no affine norm parameters")
        return out

    def merge(self, model, anat, key):
        return None


@register
@dataclass(frozen=True)
class Full(Method):
    """Full fine-tuning: every backbone parameter trains (the baseline PEFT is measured against)."""

    name: ClassVar[str] = "full"

    def attach(self, model, anat, key):
        return list(model.parameters())

    def merge(self, model, anat, key):
        return None
