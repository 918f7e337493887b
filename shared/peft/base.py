"""Method configs, the method registry and the per-model record of what was attached."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

from torch import nn

from shared.backbones import Anatomy

METHODS: dict[str, type["Method"]] = {}


def register(cls):
    """Register a method config class under its `name` (used by YAML recipes)."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Method:
    """A PEFT method: a frozen, validated config that knows how to attach itself.

    `attach` adds the method's modules to the model and returns the *existing* backbone
    parameters it wants trained (e.g. biases for BitFit). Every parameter the call creates is
    trainable; `shared.peft.attach` handles freezing and bookkeeping.
    """

    name: ClassVar[str] = ""
    # True for methods injected by Hugging Face peft: they are attached first so that our
    # hook-based methods see (and wrap) the peft layers.
    from_hf_peft: ClassVar[bool] = False

    def attach(self, model: nn.Module, anat: Anatomy, key: str) -> Iterable[nn.Parameter]:
        raise TypeError(f"{type(self).__name__} does not define attach()")

    def merge(self, model: nn.Module, anat: Anatomy, key: str) -> str | None:
        """Fold the method into the backbone weights. Returns None when done, else why not."""
        return f"{self.name} cannot be folded into the backbone weights"

    def merge_phase(self, model: nn.Module, anat: Anatomy, key: str) -> int:
        """When `merge` folds this method: 0 hooks inside a peft layer, 1 peft layers, 2 the rest.

        Folding order must follow nesting: a hook on the base layer that a peft layer wraps folds
        before the peft delta joins that base; a hook on the peft layer's output (or on a later
        module) folds after it.
        """
        return 2

    def start(self, model: nn.Module, key: str, total_steps: int) -> None:
        """Called once before training with the run's number of optimiser steps."""

    def step(self, model: nn.Module, key: str, global_step: int) -> None:
        """Called after each optimiser step (before zero_grad); most methods need nothing."""

    def regularization(self, model: nn.Module, key: str):
        """An extra loss term the method wants added while training, or None."""
        return None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


def from_dict(d: dict[str, Any]) -> Method:
    """Build a method config from a dict such as `{"name": "adapter", "bottleneck": 64}`."""
    if not isinstance(d, dict) or "name" not in d:
        raise ValueError(f"a method needs a 'name' field, got {d!r}")
    kw = dict(d)
    name = kw.pop("name")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(f"method {name!r} has no field(s) {unknown}; its fields: {sorted(known)}")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for k, v in kw.items():  # JSON / YAML give lists where configs keep tuples
        if isinstance(v, list) and "tuple" in str(types[k]):
            kw[k] = tuple(v)
    return cls(**kw)


@dataclass
class PeftState:
    """What `attach` did to a model; kept on the model as `model.peft_state`."""

    methods: list[tuple[str, Method]] = field(default_factory=list)  # (key, config)
    owner: dict[str, str] = field(default_factory=dict)  # trainable param name -> method key
    buffers: list[str] = field(default_factory=list)  # buffers the methods added (e.g. BatchNorm stats)
    fingerprint: str = ""
    backbone_id: str = ""
    merged: list[str] = field(default_factory=list)


def state_of(model: nn.Module) -> PeftState:
    st = getattr(model, "peft_state", None)
    if st is None:
        raise ValueError("this model has no PEFT methods attached; call shared.peft.attach first")
    return st


def check_choice(field_name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{field_name} must be one of {choices}, got {value!r}")


def check_positive(field_name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field_name} must be a positive number, got {value!r}")
