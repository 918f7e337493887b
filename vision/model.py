"""One frozen hierarchical backbone shared by several dense tasks, each with its own decoder.

    model = build_model("tiny-swin", tasks, methods=[{"name": "polyhistor_lite"}])
    outs = model(images)              # {task: (B, C_t, H, W)}, upsampled to the input size

With a hypernetwork method of several tasks the batch is repeated once per task and the backbone
runs once on it inside `use_task((t_0, t_1, ...))`: chunk i gets task i's generated adapter
weights (chosen per forward, thread-safe), so the cost and memory equal one run per task with
less per-call overhead. Otherwise the backbone runs once and every decoder reads the same
features (shared adapters, LoRA, BitFit, Compacter, decoder-only).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared import backbones, peft
from shared.peft.hyper import HYPER_METHODS, use_task

from .backbone import stage_dims  # importing vision.backbone registers "swin-t"
from .tasks import Task

HYPER_NAMES = {c.name for c in HYPER_METHODS}


class MLPDecoder(nn.Module):
    """SegFormer-style multi-scale MLP decoder: each stage -> 1x1 conv to `width`, upsampled to
    stage 1's grid, concatenated, fused (1x1 conv + BatchNorm + ReLU), predicted (1x1 conv),
    upsampled bilinearly to the input size."""

    def __init__(self, dims: list[int], out_channels: int, width: int = 64):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(d, width, 1) for d in dims)
        self.fuse = nn.Sequential(nn.Conv2d(width * len(dims), width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(self, feats: list[torch.Tensor], size) -> torch.Tensor:
        grid = feats[0].shape[-2:]
        x = torch.cat([F.interpolate(p(f), size=grid, mode="bilinear", align_corners=False)
                       for p, f in zip(self.proj, feats)], 1)  # (B, n*width, H/4, W/4)
        return F.interpolate(self.head(self.fuse(x)), size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def count(dims: list[int], out_channels: int, width: int) -> int:
        """Closed-form parameter count."""
        return sum(d * width + width for d in dims) + len(dims) * width * width + 2 * width + width * out_channels + out_channels


class MultiTaskDense(nn.Module):
    def __init__(self, backbone: nn.Module, tasks: dict[str, Task], decoder_width: int = 64):
        super().__init__()
        self.backbone = backbone
        self.tasks = dict(tasks)
        self.names = list(tasks)
        dims = stage_dims(backbone)
        self.decoders = nn.ModuleDict({t: MLPDecoder(dims, task.channels, decoder_width) for t, task in tasks.items()})
        self.decoder_width = decoder_width

    @property
    def per_task(self) -> bool:
        """True when the backbone's weights depend on the task (a hypernetwork with several tasks)."""
        st = getattr(self.backbone, "peft_state", None)
        return st is not None and any(isinstance(m, HYPER_METHODS) and m.tasks > 1 for _, m in st.methods)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_intermediates(x, intermediates_only=True)  # [(B, C_i, H_i, W_i)]

    def forward(self, x: torch.Tensor, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        tasks = self.names if tasks is None else tasks
        unknown = [t for t in tasks if t not in self.decoders]
        if unknown:
            raise ValueError(f"no decoder for task(s) {unknown}; this model has {self.names}")
        size = x.shape[-2:]
        if not self.per_task:
            feats = self.features(x)
            return {t: self.decoders[t](feats, size) for t in tasks}
        # one backbone run for all tasks: the batch repeated once per task, chunk i with task i's weights
        index = tuple(self.names.index(t) for t in tasks)
        with use_task(index):
            feats = self.features(x.repeat(len(index), *([1] * (x.ndim - 1))))
        chunks = [f.chunk(len(index)) for f in feats]
        return {t: self.decoders[t]([c[i] for c in chunks], size) for i, t in enumerate(tasks)}


def resolve_methods(methods: list[dict[str, Any]] | None, num_tasks: int) -> list[dict[str, Any]]:
    """Hypernetwork methods get `tasks` = the number of tasks unless a recipe says otherwise."""
    out = []
    for m in methods or []:
        m = dict(m)
        if m.get("name") in HYPER_NAMES:
            m.setdefault("tasks", num_tasks)
            if m["tasks"] != num_tasks:
                raise ValueError(f"method {m['name']}: tasks={m['tasks']} but the data has {num_tasks} tasks")
        out.append(m)
    return out


def build_model(backbone: str | nn.Module, tasks: dict[str, Task], methods: list[dict] | None = None,
                backbone_kwargs: dict | None = None, decoder_width: int = 64) -> MultiTaskDense:
    """The backbone with `methods` attached (everything else frozen; `[]` = decoder-only,
    `[{name: full}]` = full fine-tuning) and one decoder per task."""
    bb = backbones.create(backbone, **(backbone_kwargs or {})) if isinstance(backbone, str) else backbone
    peft.attach(bb, resolve_methods(methods, len(tasks)))
    return MultiTaskDense(bb, tasks, decoder_width)


def trainable_counts(model: MultiTaskDense) -> dict[str, int]:
    s = peft.summary(model.backbone)
    dec = sum(p.numel() for p in model.decoders.parameters() if p.requires_grad)
    return {"backbone": sum(s["by_method"].values()), "decoders": dec,
            "trainable": sum(s["by_method"].values()) + dec, "total": sum(p.numel() for p in model.parameters())}


def add_task(model: MultiTaskDense, name: str, task: Task) -> None:
    """Adapt a trained multi-task model to one more task: a new task embedding in every
    hypernetwork method and a new decoder are all that train; everything else is frozen."""
    from shared.peft.hyper import add_task as add_embedding, task_parameter_names

    if name in model.decoders:
        raise ValueError(f"task {name!r} already has a decoder")
    index = add_embedding(model.backbone)
    if index != len(model.names):
        raise ValueError(f"the hypernetwork has {index} tasks but the model has {len(model.names)} decoders")
    keep = set(task_parameter_names(model.backbone, index))
    for n, p in model.backbone.named_parameters():
        p.requires_grad_(n in keep)
    for p in model.decoders.parameters():
        p.requires_grad_(False)
    ref = next(model.decoders.parameters())
    model.decoders[name] = MLPDecoder(stage_dims(model.backbone), task.channels, model.decoder_width).to(ref.device)
    model.tasks[name] = task
    model.names.append(name)
