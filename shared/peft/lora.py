"""The LoRA family, injected by Hugging Face `peft` (`inject_adapter_in_model`).

We only translate our small configs into peft configs and let peft do the work: LoRA, DoRA,
AdaLoRA, IA3, LoHa, LoKr and VeRA. Targets are module names (matched by peft: exact name or
name suffix) or one regex string (full match), with optional excludes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import peft as hf_peft
from torch import nn

from .base import Method, check_choice, check_positive, register

Targets = tuple[str, ...] | str


def _targets(targets: Targets):
    return targets if isinstance(targets, str) else list(targets)


def _exclude(exclude: tuple[str, ...]) -> dict:
    return {"exclude_modules": list(exclude)} if exclude else {}


@dataclass(frozen=True)
class _PeftMethod(Method):
    from_hf_peft: ClassVar[bool] = True

    def __post_init__(self):
        t = self.targets
        if isinstance(t, list):
            object.__setattr__(self, "targets", tuple(t))
        if not self.targets or (not isinstance(self.targets, str) and not all(isinstance(x, str) for x in self.targets)):
            raise ValueError(f"{self.name}: targets must be module names or one regex, got {self.targets!r}")

    def peft_config(self):
        raise TypeError(f"{type(self).__name__} must define peft_config()")

    def inject(self, model, key) -> None:
        hf_peft.inject_adapter_in_model(self.peft_config(), model, adapter_name=key)

    def attach(self, model, anat, key):
        from peft.tuners.tuners_utils import BaseTunerLayer

        try:
            self.inject(model, key)
        except ValueError as e:
            if "not found in the base model" in str(e):  # peft names the targets that matched nothing
                raise ValueError(f"{self.name}: targets {self.targets!r} matched no layer of "
                                 f"{type(model).__name__}: {e}") from None
            raise ValueError(f"{self.name}: {e}") from None
        # The trained tensors are the layers' adapter tensors for this key (peft's
        # `adapter_layer_names`), not every new parameter (AdaLoRA's `ranknum` is a constant).
        trained = []
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                for attr in module.adapter_layer_names:
                    container = getattr(module, attr, None)
                    if container is not None and key in container:
                        item = container[key]
                        trained += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
        return trained

    def merge_phase(self, model, anat, key) -> int:
        return 1

    def merge(self, model, anat, key):
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, BaseTunerLayer) and key in m.active_adapters]
        for name, layer in layers:  # a hook that reshapes the base output would see the delta after merging
            blocking = [fn for fn in layer.get_base_layer()._forward_hooks.values()
                        if not getattr(getattr(fn, "__self__", None), "additive", False)]
            if blocking:
                return (f"{name}: a method attached before it hooks the base layer's output "
                        f"({type(getattr(blocking[0], '__self__', blocking[0])).__name__}) and stays attached; "
                        f"merging would change what that hook sees")
        for name, layer in layers:
            layer.merge(adapter_names=[key])
            _replace_with_base(model, name, layer)
        return None


def _replace_with_base(model: nn.Module, name: str, layer) -> None:
    """Swap a merged peft layer for its base layer, keeping hooks other methods put on it."""
    base = layer.get_base_layer()
    base._forward_hooks.update(layer._forward_hooks)
    base._forward_pre_hooks.update(layer._forward_pre_hooks)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, base)


@register
@dataclass(frozen=True)
class LoRA(_PeftMethod):
    """Low-rank update W + (alpha / r) B A, B zero-initialised (Hu et al. 2021)."""

    name: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16.0
    targets: Targets = ("qkv",)
    exclude: tuple[str, ...] = ()
    dropout: float = 0.0
    bias: str = "none"  # "lora_only": also train the biases of the adapted layers (DINOv2 radiology)

    def __post_init__(self):
        super().__post_init__()
        check_positive("r", self.r)
        check_choice("bias", self.bias, ("none", "lora_only"))

    def peft_config(self, **extra):
        return hf_peft.LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=_targets(self.targets),
                                  exclude_modules=list(self.exclude) or None,
                                  lora_dropout=self.dropout, bias=self.bias, **extra)

    def attach(self, model, anat, key):
        trained = list(super().attach(model, anat, key))
        if self.bias == "lora_only":  # the adapted layers' own biases (existing backbone tensors)
            from peft.tuners.tuners_utils import BaseTunerLayer

            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and key in module.active_adapters:
                    b = getattr(module.get_base_layer(), "bias", None)
                    if isinstance(b, nn.Parameter):
                        trained.append(b)
        return trained


@register
@dataclass(frozen=True)
class DoRA(LoRA):
    """Weight-decomposed LoRA: magnitude vector + LoRA on the direction (Liu et al. 2024)."""

    name: ClassVar[str] = "dora"

    def peft_config(self):
        return super().peft_config(use_dora=True)


@register
@dataclass(frozen=True)
class AdaLoRA(_PeftMethod):
    """SVD-form LoRA (P diag(E) Q) whose ranks are reallocated during training (Zhang et al. 2023).

    The rank budget moves from `init_r` per layer towards `target_r` on average between steps
    `tinit` and `total_step - tfinal` (peft's RankAllocator), then stays fixed: every later step
    re-applies the final rank pattern, so pruned singular values cannot grow back. An
    orthogonality penalty keeps P and Q near-orthogonal. The training module drives both through
    `shared.peft.start` (which sets `total_step` from the run when it is None),
    `shared.peft.step` and `shared.peft.regularization`.
    """

    name: ClassVar[str] = "adalora"
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    targets: Targets = ("qkv",)
    exclude: tuple[str, ...] = ()
    total_step: int | None = None  # None: the run's number of optimiser steps (shared.peft.start)
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    orth_reg_weight: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check_positive("init_r", self.init_r)
        check_positive("total_step", self.total_step, allow_none=True)
        if self.total_step is not None:
            self._check_schedule(self.total_step)

    def _check_schedule(self, total_step: int) -> None:
        if self.tinit + self.tfinal >= total_step:
            raise ValueError(f"adalora: tinit ({self.tinit}) + tfinal ({self.tfinal}) must be below total_step "
                             f"({total_step}), or no step is left for the rank allocation")

    def peft_config(self):
        # peft needs a total_step when the tuner is built; a run-derived one is set by start().
        total = self.total_step or self.tinit + self.tfinal + 1
        return hf_peft.AdaLoraConfig(init_r=self.init_r, target_r=self.target_r, lora_alpha=self.alpha,
                                     target_modules=_targets(self.targets), total_step=total,
                                     tinit=self.tinit, tfinal=self.tfinal, deltaT=self.delta_t,
                                     orth_reg_weight=self.orth_reg_weight, **_exclude(self.exclude))

    def inject(self, model, key) -> None:
        # peft's tuner owns the RankAllocator; building it injects into `model` in place. It is
        # kept in a plain dict (not registered as a submodule: it wraps `model` itself).
        from peft.tuners.adalora import AdaLoraModel

        model.__dict__.setdefault("peft_tuners", {})[key] = AdaLoraModel(model, self.peft_config(), adapter_name=key)

    def start(self, model, key, total_steps: int) -> None:
        """Set the schedule's length from the run when the config leaves total_step to it."""
        tuner = model.__dict__.get("peft_tuners", {}).get(key)
        if tuner is None or self.total_step is not None:
            return
        self._check_schedule(total_steps)
        tuner.peft_config[key].total_step = int(total_steps)  # the RankAllocator reads this very config
        tuner.__dict__["peft_started"] = True

    def step(self, model, key, global_step: int) -> None:
        """After the optimiser step, before zero_grad: update importance scores and rank masks; after
        `total_step - tfinal`, re-apply the final rank pattern at every step (peft's masking)."""
        tuner = model.__dict__.get("peft_tuners", {}).get(key)
        if tuner is None:
            return
        if self.total_step is None and not tuner.__dict__.get("peft_started"):
            raise RuntimeError("adalora: total_step is None and the run length is unknown; pass total_step or "
                               "call shared.peft.start(model, total_steps) before training")
        tuner.update_and_allocate(global_step)

    def regularization(self, model, key):
        """||P P^T - I||_F and ||Q^T Q - I||_F averaged over the adapted layers, times orth_reg_weight."""
        import torch

        terms = []
        for name, p in model.named_parameters():
            if p.requires_grad and f".{key}" in name and ("lora_A" in name or "lora_B" in name):
                cov = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device)))
        return self.orth_reg_weight * torch.stack(terms).mean() if terms else None


@register
@dataclass(frozen=True)
class IA3(_PeftMethod):
    """Learned per-channel rescaling of activations, initialised at 1 (Liu et al. 2022).

    `feedforward` names the targets whose *input* is scaled (IA3's FFN convention); the
    other targets have their output scaled.
    """

    name: ClassVar[str] = "ia3"
    targets: Targets = ("qkv", "fc2")
    feedforward: tuple[str, ...] = ("fc2",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.feedforward, list):
            object.__setattr__(self, "feedforward", tuple(self.feedforward))
        if not isinstance(self.targets, str):
            stray = [f for f in self.feedforward if f not in self.targets]
            if stray:
                raise ValueError(f"ia3: feedforward {stray} must also be listed in targets {list(self.targets)} "
                                 "(feedforward names the targets whose input is scaled)")

    def peft_config(self):
        return hf_peft.IA3Config(target_modules=_targets(self.targets),
                                 feedforward_modules=list(self.feedforward),
                                 exclude_modules=list(self.exclude) or None)


@register
@dataclass(frozen=True)
class LoHa(_PeftMethod):
    """Low-rank Hadamard product update (Hyeon-Woo et al. 2022)."""

    name: ClassVar[str] = "loha"
    r: int = 8
    alpha: float = 8.0
    targets: Targets = ("qkv",)
    exclude: tuple[str, ...] = ()

    def peft_config(self):
        return hf_peft.LoHaConfig(r=self.r, alpha=self.alpha, target_modules=_targets(self.targets),
                                  exclude_modules=list(self.exclude) or None)


@register
@dataclass(frozen=True)
class LoKr(_PeftMethod):
    """Low-rank Kronecker product update (Yeh et al. 2024)."""

    name: ClassVar[str] = "lokr"
    r: int = 8
    alpha: float = 8.0
    targets: Targets = ("qkv",)
    exclude: tuple[str, ...] = ()

    def peft_config(self):
        return hf_peft.LoKrConfig(r=self.r, alpha=self.alpha, target_modules=_targets(self.targets),
                                  exclude_modules=list(self.exclude) or None)


@register
@dataclass(frozen=True)
class VeRA(_PeftMethod):
    """Shared frozen random low-rank matrices with trained scaling vectors (Kopiczko et al. 2024).

    All targets must have the same shape (peft shares one random pair per shape).
    """

    name: ClassVar[str] = "vera"
    r: int = 64
    targets: Targets = ("qkv",)
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def peft_config(self):
        if self.exclude:
            raise ValueError("vera: peft's VeraConfig has no exclude option; select targets by name or regex")
        return hf_peft.VeraConfig(r=self.r, target_modules=_targets(self.targets), projection_prng_key=self.seed,
                                  save_projection=True)

    def inject(self, model, key) -> None:
        # VeRA keeps its shared random projections on the tuner, which injection alone does
        # not create; building the tuner injects into `model` in place.
        from peft.tuners.vera import VeraModel

        VeraModel(model, self.peft_config(), adapter_name=key)


__all__ = ["LoRA", "DoRA", "AdaLoRA", "IA3", "LoHa", "LoKr", "VeRA"]
