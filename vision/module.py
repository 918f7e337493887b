"""The multi-task dense LightningModule: sum of per-task losses, split-level metrics per task
(torchmetrics meters of `vision.metrics`, reduced across DDP ranks; `definition` chooses the
metric definitions, the benchmark's reference by default)."""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from shared import peft
from shared.distributed import EvalShare
from shared.module import log_eval_mean, shard_for_strategy

from .metrics import make_meter, resolve_definitions
from .model import MultiTaskDense
from .tasks import IGNORE, Task


def task_loss(task: Task, out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (classes), BCE (binary maps), L1 of unit normals, L1 of depth; pixels without
    a label (255, all-zero normals, depth 0) do not count. A batch with none gives 0 (with grad)."""
    if task.kind in ("classes", "binary"):
        valid = label != IGNORE
        if not valid.any():
            return out.sum() * 0
        if task.kind == "classes":
            return F.cross_entropy(out, label, ignore_index=IGNORE)
        return F.binary_cross_entropy_with_logits(out[:, 0][valid], label[valid].float())
    if task.kind == "normals":
        valid = label.abs().sum(1) > 0
        if not valid.any():
            return out.sum() * 0
        return (F.normalize(out, dim=1) - label).abs().sum(1)[valid].mean()
    valid = label[:, 0] > 0
    if not valid.any():
        return out.sum() * 0
    return (out[:, 0] - label[:, 0])[valid].abs().mean()


class DenseModule(L.LightningModule):
    def __init__(self, model: MultiTaskDense, lr: float = 1e-3, weight_decay: float = 1e-4, warmup_steps: int = 0,
                 definition: str | dict[str, str] | None = None):
        super().__init__()
        self.model, self.lr, self.weight_decay, self.warmup_steps = model, lr, weight_decay, warmup_steps
        self.definitions = resolve_definitions(model.tasks, definition)  # {task: metric definition}
        self.meters = torch.nn.ModuleDict({t: make_meter(task, self.definitions[t]) for t, task in model.tasks.items()})
        self.results: dict[str, dict[str, float]] = {}

    def forward(self, x):
        return self.model(x)

    def _losses(self, batch):
        outs = self.model(batch["image"])
        return outs, {t: task_loss(self.model.tasks[t], outs[t], batch["labels"][t]) for t in outs}

    def training_step(self, batch, batch_idx):
        _, losses = self._losses(batch)
        loss = sum(losses.values())
        reg = peft.regularization(self.model.backbone)
        if reg is not None:
            loss = loss + reg
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for t, v in losses.items():
            self.log(f"train/{t}_loss", v, batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx):
        outs = self.model(batch["image"])
        n = self.share.keep(batch["image"].shape[0])  # the distributed sampler's padding counts nowhere
        if n == 0:
            return
        outs, labels = {t: o[:n] for t, o in outs.items()}, {t: v[:n] for t, v in batch["labels"].items()}
        losses = {t: task_loss(self.model.tasks[t], outs[t], labels[t]) for t in outs}
        log_eval_mean(self, "val/loss", sum(losses.values()), n)
        for t, out in outs.items():
            self.meters[t].update(out, labels[t])

    test_step = validation_step

    def on_validation_epoch_start(self):
        for m in self.meters.values():
            m.reset()
        self.share = EvalShare()  # this process's share of the split (DDP / FSDP)
        self.share.start(self.trainer)

    on_test_epoch_start = on_validation_epoch_start

    def _finish(self, stage):
        self.results = {t: m.compute() for t, m in self.meters.items()}  # every rank: the whole split's values
        for t, ms in self.results.items():
            for k, v in ms.items():  # identical on every rank already; sync_dist only says so to Lightning
                self.log(f"{stage}/{t}/{k}", v, sync_dist=True)

    def on_validation_epoch_end(self):
        self._finish("val")

    def on_test_epoch_end(self):
        self._finish("test")

    def configure_model(self):
        shard_for_strategy(self, self.model)  # ModelParallelStrategy: FSDP2 (shared.distributed)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = self.warmup_steps

        def factor(step):  # linear warmup, cosine decay
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}
