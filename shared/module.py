"""The generic LightningModule for single- and multi-label classification with PEFT methods.

Domains reuse it through `shared.cli`; a thin subclass only where the task differs.
"""
from __future__ import annotations

import math
import re
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy, MulticlassAUROC, MultilabelAUROC, MultilabelAveragePrecision,
)

from shared import backbones, peft
from shared.heads import asymmetric_loss, build_head


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at `total` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class PeftModule(L.LightningModule):
    """Conventions every PEFT task module shares: AdamW over the trainable tensors (optionally
    grouped by `lr_groups`), a per-step cosine schedule with warm-up, testing on the best
    validation checkpoint (`monitor`), and checkpoints that hold only the trained tensors.

    Subclasses set `self.model`, `monitor`, and `trained_tensor_names()`; hparams must include
    lr, weight_decay, betas, eps, warmup_fraction (and optionally lr_groups).
    """

    monitor = "val/loss"

    def trained_tensor_names(self) -> list[str]:
        raise TypeError(f"{type(self).__name__} must define trained_tensor_names()")

    def _shared_step(self, batch, stage: str):
        raise TypeError(f"{type(self).__name__} must define _shared_step(batch, stage)")

    def _log_metrics(self, stage: str) -> None:
        raise TypeError(f"{type(self).__name__} must define _log_metrics(stage)")

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def on_validation_epoch_end(self):
        self._log_metrics("val")

    def on_test_epoch_end(self):
        self._log_metrics("test")


    def configure_optimizers(self):
        hp = self.hparams
        groups: dict[float, list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            lr = next((g_lr for pat, g_lr in (hp.get("lr_groups") or {}).items() if re.search(pat, name)), hp.lr)
            groups.setdefault(lr, []).append(p)
        opt = torch.optim.AdamW([{"params": ps, "lr": lr} for lr, ps in groups.items()],
                                lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_fraction * total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self):
        # Test on the best validation checkpoint, never the last epoch.
        return [L.pytorch.callbacks.ModelCheckpoint(monitor=self.monitor, mode="max", save_top_k=1,
                                                    filename="best", auto_insert_metric_name=False)]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # After optimizer.step(), gradients still present (peft's documented order for AdaLoRA).
        peft.step(self.model, self.global_step - 1)

    def on_save_checkpoint(self, checkpoint):
        # Only what was trained (adapters, heads, decoders, method buffers), not the frozen backbone.
        keep = {f"model.{k}" for k in self.trained_tensor_names()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in keep or k.startswith("metrics.")}


class ClassificationModule(PeftModule):
    """A backbone + PEFT methods + head, trained with AdamW and a per-step cosine schedule.

    Args:
        backbone: a name registered in `shared.backbones` (e.g. `tiny-vit`, `ast`, `dinov2`).
        backbone_kwargs: passed to the backbone constructor.
        methods: PEFT method configs, e.g. `[{name: adapter, placement: ffn, bottleneck: 64}]`;
            `[{name: full}]` is full fine-tuning; `[]` trains the head only (linear probe).
        head: head config for `shared.heads.build_head` without `dim`/`num_classes`.
        num_classes / labels: usually linked from the data module by the CLI.
        multilabel: sigmoid outputs, BCE (or `loss: asl`), macro AP / AUROC metrics.
        lr, weight_decay, betas, eps: AdamW.
        lr_groups: {regex on parameter name: lr}, e.g. `{"head\\.prototypes": 0.04}`.
        warmup_fraction: share of the total steps spent in linear warm-up.
        orthogonality_weight: weight of a prototypical head's orthogonality loss.
        init_bundle: start from a saved adapter bundle (its methods and head replace `methods` /
            `head`): evaluate a downloaded adapter on your data, or keep training it. Its labels
            must equal the data's labels.
    """

    def __init__(self, backbone: str = "tiny-vit", backbone_kwargs: dict[str, Any] | None = None,
                 methods: list[dict[str, Any]] | None = None, head: dict[str, Any] | None = None,
                 num_classes: int = 2, labels: list[str] | None = None, multilabel: bool = False,
                 loss: str = "auto", lr: float = 1e-3, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr_groups: dict[str, float] | None = None, warmup_fraction: float = 0.0,
                 orthogonality_weight: float = 0.0, preprocessing: dict[str, Any] | None = None,
                 init_bundle: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        if loss not in ("auto", "ce", "bce", "asl"):
            raise ValueError(f"loss must be auto, ce, bce or asl, got {loss!r}")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels for num_classes={num_classes}")
        net = backbones.create(backbone, **(backbone_kwargs or {}))
        if init_bundle:
            self.model = self._from_bundle(net, init_bundle, labels, num_classes)
        else:
            peft.attach(net, methods or [], backbone_id=backbone)
            head_cfg = {"kind": "linear", **(head or {})}
            head_cfg.update(dim=backbones.anatomy(net).embed_dim, num_classes=num_classes)
            self.model = peft.Classifier(net, build_head(head_cfg), labels=labels)
        self.multilabel = multilabel
        self.loss_kind = ("bce" if multilabel else "ce") if loss == "auto" else loss
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.metrics = torch.nn.ModuleDict({s: self._metrics(num_classes) for s in ("val", "test")})

    @staticmethod
    def _from_bundle(net, path: str, labels: list[str] | None, num_classes: int) -> peft.Classifier:
        meta = peft.read_meta(path)
        if not meta.get("head"):
            raise peft.BundleError(f"{path}: the bundle has no classification head")
        if labels is not None and meta.get("labels") is not None and list(meta["labels"]) != list(labels):
            theirs, ours = meta["labels"], list(labels)
            diff = sorted(set(theirs) ^ set(ours))[:5]
            raise ValueError(f"{path}: the bundle's {len(theirs)} labels disagree with the data's {len(ours)} labels "
                             f"({'e.g. ' + ', '.join(map(str, diff)) if diff else 'same names, different order'})")
        if meta["head"].get("num_classes") != num_classes:
            raise ValueError(f"{path}: the bundle predicts {meta['head'].get('num_classes')} classes, the data has {num_classes}")
        model = peft.load(net, path)
        for p in model.head.parameters():
            p.requires_grad_(True)  # heads train with the methods, as when the bundle was made
        return model

    def _metrics(self, c: int) -> MetricCollection:
        if self.hparams.multilabel:
            # ignore_index: unknown targets (NaN, e.g. CheXpert's "ignore" policy) become -1
            return MetricCollection({"map": MultilabelAveragePrecision(c, average="macro", ignore_index=-1),
                                     "auroc": MultilabelAUROC(c, average="macro", ignore_index=-1)})
        ms = {"acc": MulticlassAccuracy(c, average="micro")}
        if c > 2:
            ms["auroc"] = MulticlassAUROC(c, average="macro")
        return MetricCollection(ms)

    @property
    def monitor(self) -> str:  # noqa: D401 - overrides the base attribute
        return "val/map" if self.hparams.multilabel else "val/acc"

    def forward(self, inputs):
        return self.model(inputs)

    def loss(self, logits, y):
        if self.loss_kind == "ce":
            return F.cross_entropy(logits, y)
        if self.loss_kind == "bce":
            return F.binary_cross_entropy_with_logits(logits, y.float())
        return asymmetric_loss(logits, y.float())

    def _shared_step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        if stage == "train":
            if self.hparams.orthogonality_weight:
                loss = loss + self.hparams.orthogonality_weight * self.model.head.orthogonality_loss()
            extra = peft.regularization(self.model)  # e.g. AdaLoRA's orthogonality penalty
            if extra is not None:
                loss = loss + extra
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=len(y), sync_dist=stage != "train")
        if stage != "train":
            probs = logits.sigmoid() if self.multilabel else logits.softmax(-1)
            target = torch.nan_to_num(y.float(), nan=-1.0).int() if self.multilabel else y.long()
            self.metrics[stage].update(probs, target)
        return loss

    def _log_metrics(self, stage):
        values = self.metrics[stage].compute()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=True, sync_dist=True)
        self.metrics[stage].reset()

    def trained_tensor_names(self) -> list[str]:
        return peft_tensor_names(self.model)

    def param_summary(self) -> dict[str, Any]:
        return peft.summary(self.model)

    def bundle_extra(self) -> dict[str, Any]:
        """Fields a bundle needs for prediction beyond the core's (task, label semantics)."""
        return {"task": "classification", "multilabel": self.multilabel}

    def save_bundle(self, path, metrics: dict[str, Any] | None = None):
        return peft.save(self.model, path, labels=self.hparams.labels, metrics=metrics,
                         preprocessing=self.hparams.preprocessing, backbone_id=self.hparams.backbone,
                         backbone_kwargs=self.hparams.backbone_kwargs, extra=self.bundle_extra())


def peft_tensor_names(model) -> list[str]:
    """Names (relative to a Classifier) of the tensors an adapter bundle stores."""
    from shared.artifacts import trained_tensors

    names = [f"backbone.{n}" for n in trained_tensors(model.backbone)]
    return names + [f"head.{n}" for n in model.head.state_dict()]
