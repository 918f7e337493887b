"""LoRA on chosen parts of a fused q/k/v projection (timm's `attn.qkv`).

Hugging Face peft adapts whole layers, so on a fused `qkv` Linear it updates queries, keys and
values together. PETL-AST and the DINOv2 radiology study adapt only W_q and W_v; this method
gives each chosen part its own low-rank pair: out[part] += (alpha / r) B_part A_part x.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Method, check_positive, register

PARTS = ("q", "k", "v")


class FusedQKVLoRALayer(nn.Module):
    """Low-rank updates of some of the three equal output blocks of a fused q/k/v Linear."""

    additive = True  # the delta depends on the layer input only

    def __init__(self, d_in: int, d_part: int, r: int, parts: tuple[str, ...], scale: float, key: str = ""):
        super().__init__()
        self.d_part, self.parts, self.scale, self.key = d_part, tuple(parts), scale, key
        self.lora_a = nn.Parameter(torch.empty(len(parts), r, d_in))  # (P, r, in)
        self.lora_b = nn.Parameter(torch.zeros(len(parts), d_part, r))  # (P, out/3, r), zero: identity at init
        for a in self.lora_a:  # peft's LoRA init of A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def install(self, linear: nn.Module) -> None:
        ref = linear.weight
        self.to(device=ref.device, dtype=ref.dtype)
        linear.register_forward_hook(self._on_output)

    def delta_weight(self) -> torch.Tensor:
        """The (3 * d_part, in) update the parts add to the fused weight."""
        w = self.lora_a.new_zeros(3, self.d_part, self.lora_a.shape[-1])
        for i, p in enumerate(self.parts):
            w[PARTS.index(p)] = self.lora_b[i] @ self.lora_a[i]
        return self.scale * w.reshape(3 * self.d_part, -1)

    def _on_output(self, module, args, out):
        z = torch.einsum("...i,pri->...pr", args[0], self.lora_a)  # (..., P, r)
        d = self.scale * torch.einsum("...pr,pdr->...pd", z, self.lora_b)  # (..., P, d_part)
        pieces = list(out.split(self.d_part, dim=-1))  # q, k, v: (..., d_part) each
        for i, p in enumerate(self.parts):
            pieces[PARTS.index(p)] = pieces[PARTS.index(p)] + d[..., i, :]
        return torch.cat(pieces, dim=-1)


@register
@dataclass(frozen=True)
class QKVLoRA(Method):
    """LoRA on the q and v (by default) blocks of fused q/k/v projections (`targets`: module names,
    matched by exact name or dotted suffix, as peft does)."""

    name: ClassVar[str] = "lora_qkv"
    r: int = 8
    alpha: float = 16.0
    parts: tuple[str, ...] = ("q", "v")
    targets: tuple[str, ...] = ("qkv",)

    def __post_init__(self):
        for f in ("parts", "targets"):
            if isinstance(getattr(self, f), list):
                object.__setattr__(self, f, tuple(getattr(self, f)))
        check_positive("r", self.r)
        if not self.parts or len(set(self.parts)) != len(self.parts) or not set(self.parts) <= set(PARTS):
            raise ValueError(f"lora_qkv: parts must be distinct names from {PARTS}, got {self.parts!r}")

    def _layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = [(n, m) for n, m in model.named_modules()
                 if any(n == t or n.endswith("." + t) for t in self.targets) and hasattr(m, "weight")
                 and isinstance(getattr(m, "weight"), torch.Tensor) and m.weight.dim() == 2]
        if not found:
            raise ValueError(f"lora_qkv: targets {self.targets!r} matched no layer of {type(model).__name__}; "
                             "it needs fused q/k/v projections (timm ViT / Swin `qkv`). Backbones with separate "
                             "q/k/v layers take plain `lora` with targets such as ['q_proj', 'v_proj']")
        for n, m in found:
            if m.weight.shape[0] % 3:
                raise ValueError(f"lora_qkv: {n} has {m.weight.shape[0]} outputs, not three equal q/k/v blocks")
        return found

    def attach(self, model, anat, key):
        plan = [(n, m, FusedQKVLoRALayer(m.weight.shape[1], m.weight.shape[0] // 3, self.r, self.parts,
                                         self.alpha / self.r, key)) for n, m in self._layers(model)]
        for n, m, layer in plan:
            parent_name, _, child = n.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            parent.add_module(f"peft_{key}_{child}", layer)
            layer.install(m)
        return ()

    def merge(self, model, anat, key):
        from peft.tuners.tuners_utils import BaseTunerLayer

        from .adapters import hooks_of

        layers = [m for m in model.modules() if isinstance(m, FusedQKVLoRALayer) and m.key == key
                  and any(True for _ in hooks_of(m, model))]
        for layer in layers:
            site = next(m for m, hooks, _ in hooks_of(layer, model) if hooks is m._forward_hooks)
            target = site.get_base_layer() if isinstance(site, BaseTunerLayer) else site
            with torch.no_grad():  # additive: folding commutes with any other method on the layer
                target.weight.add_(layer.delta_weight().to(target.weight))
            for _, hooks, hid in list(hooks_of(layer, model)):
                del hooks[hid]
        return None

