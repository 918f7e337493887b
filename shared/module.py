"""The generic LightningModule for single- and multi-label classification with PEFT methods.

Domains reuse it through `shared.cli`; a thin subclass only where the task differs.
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.classification import binary_auroc, binary_average_precision
from torchmetrics.utilities import dim_zero_cat

from shared import backbones, peft
from shared.depth_cache import DepthCaching, check_mode
from shared.distributed import EvalShare, fully_shard_model
from shared.heads import asymmetric_loss, build_head


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at `total` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# Parameters AdamW should not decay when `decay_exclude` is on: every 0-/1-D tensor (biases, norm
# scales, BitFit), learned tokens (prompts, prefixes, positions, CLS / registers) and prototypes.
NO_DECAY = re.compile(r"peft_prompt|peft_prefix|prototypes|pos_embed|cls_token|reg_token|dist_token")


def excluded_from_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or bool(NO_DECAY.search(name))


def monitor_mode(metric: str) -> str:
    """"min" for metrics where lower is better (losses, distances, errors), else "max"."""
    return "min" if re.search(r"loss|hd95|error|distance", metric.rsplit("/", 1)[-1]) else "max"


def macro_over_defined(preds: torch.Tensor, target: torch.Tensor, kind: str = "auroc"
                       ) -> tuple[float, torch.Tensor, int]:
    """Per-class binary AUROC or AP of (N, C) scores against (N, C) {0, 1} targets (-1 = unknown,
    left out), averaged over the classes that have both positives and negatives in `target`.

    Returns (mean, per-class values with nan where undefined, number of classes dropped). The mean
    is nan when no class is defined. torchmetrics' macro average counts an undefined class as 0.
    """
    fn = {"auroc": binary_auroc, "ap": binary_average_precision}[kind]
    values = torch.full((preds.shape[1],), float("nan"))
    for c in range(preds.shape[1]):
        keep = target[:, c] >= 0
        y = target[keep, c].long()
        if y.numel() and 0 < int(y.sum()) < y.numel():
            values[c] = fn(preds[keep, c].float(), y).float().cpu()
    defined = ~torch.isnan(values)
    mean = float(values[defined].mean()) if defined.any() else float("nan")
    return mean, values, int((~defined).sum())


class PerClassScore(Metric):
    """AUROC or AP per class (one-vs-rest) over a whole split, macro-averaged over the classes that
    have positives and negatives in it (`macro_over_defined`). `compute()` gives the per-class
    values (nan = undefined). Single-label targets (N,) are one-hot encoded; with `binary=True`
    (two classes) only class 1 is scored, the usual binary AUROC."""

    full_state_update = False

    def __init__(self, kind: str = "auroc", binary: bool = False, **kw):
        super().__init__(**kw)
        if kind not in ("auroc", "ap"):
            raise ValueError(f"kind must be auroc or ap, got {kind!r}")
        self.kind, self.binary = kind, binary
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if target.ndim == 1:  # single-label: class scores (N, C), targets (N,)
            target = F.one_hot(target.long(), preds.shape[1])
        if self.binary:
            preds, target = preds[:, 1:], target[:, 1:]
        self.preds.append(preds.detach().float())
        self.target.append(target.detach().long())

    def compute(self) -> torch.Tensor:
        return macro_over_defined(dim_zero_cat(self.preds), dim_zero_cat(self.target), self.kind)[1]


def shard_for_strategy(module: L.LightningModule, model: torch.nn.Module) -> None:
    """`configure_model` of our LightningModules: under Lightning's `ModelParallelStrategy`, shard
    `model` with FSDP2 over the data-parallel mesh (`shared.distributed.fully_shard_model`); other
    strategies (single device, DDP) keep it whole."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = module._trainer  # None in load_from_checkpoint, which calls configure_model too
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return
    mesh = module.device_mesh
    if mesh["tensor_parallel"].size() > 1:
        n = mesh.size()
        raise ValueError(f"ModelParallelStrategy: our models shard by data parallelism (FSDP2) only, but the mesh "
                         f"gives tensor_parallel_size={mesh['tensor_parallel'].size()}: set "
                         f"--trainer.strategy.data_parallel_size {n} --trainer.strategy.tensor_parallel_size 1")
    fully_shard_model(model, mesh=mesh["data_parallel"])


def log_eval_mean(module: L.LightningModule, name: str, value: torch.Tensor, n: int, prog_bar: bool = False) -> None:
    """Log `name` (e.g. "val/loss", a mean over the batch's n samples) as its mean over the split's
    samples, reduced over every process: a torchmetrics `MeanMetric` sums value * n and n across
    processes. (Lightning's epoch mean of `self.log(..., sync_dist=True)` averages each process's
    sample count as an integer, which truncates whenever the processes' shares differ in size.)"""
    means = getattr(module, "eval_means", None)
    if means is None:
        module.eval_means = means = torch.nn.ModuleDict()
    key = name.replace("/", "__")
    if key not in means:  # made on first use, on the device of the values
        means[key] = MeanMetric().to(value.device)
    means[key].update(value.detach(), weight=n)
    module.log(name, means[key], prog_bar=prog_bar, on_step=False, on_epoch=True, batch_size=n,
               metric_attribute=f"eval_means.{key}")


def sharded_state(state_dict: dict[str, Any]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) for v in state_dict.values())


class PeftModule(DepthCaching, L.LightningModule):
    """Conventions every PEFT task module shares: AdamW over the trainable tensors (optionally
    grouped by `lr_groups`), a per-step cosine schedule with warm-up, testing on the best
    validation checkpoint (`monitor`), and checkpoints that hold only the trained tensors.

    Subclasses set `self.model`, `monitor`, and `trained_tensor_names()`; hparams must include
    lr, weight_decay, betas, eps, warmup_fraction (and optionally lr_groups and decay_exclude:
    no weight decay on biases, norms, prompts, prefixes and prototypes). The checkpoint mode
    follows the monitored metric (`monitor_mode`: min for losses and distances, else max).

    Several processes (docs/operations.md): evaluation steps count only `real(n)` samples of each
    batch (the distributed sampler's padding is left out), validation / test losses go through
    `log_eval_mean`, and `configure_model` shards `self.model` with FSDP2 under Lightning's
    `ModelParallelStrategy`.
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

    def on_validation_epoch_start(self):
        self.eval_share = EvalShare()
        self.eval_share.start(self.trainer)

    def on_test_epoch_start(self):
        self.on_validation_epoch_start()

    def real(self, n: int) -> int:
        """How many leading samples of this evaluation batch of n are real: under DDP / FSDP the
        distributed sampler pads the split with repeats after them, which no loss or metric counts."""
        share = getattr(self, "eval_share", None)
        return n if share is None else share.keep(n)

    def on_validation_epoch_end(self):
        self._log_metrics("val")

    def on_test_epoch_end(self):
        self._log_metrics("test")

    def configure_model(self):
        shard_for_strategy(self, self.model)

    def configure_optimizers(self):
        hp = self.hparams
        groups: dict[tuple[float, float], list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            lr = next((g_lr for pat, g_lr in (hp.get("lr_groups") or {}).items() if re.search(pat, name)), hp.lr)
            wd = 0.0 if hp.get("decay_exclude") and excluded_from_decay(name, p) else hp.weight_decay
            groups.setdefault((lr, wd), []).append(p)
        opt = torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                                lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_fraction * total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self):
        # Test on the best validation checkpoint, never the last epoch.
        return [L.pytorch.callbacks.ModelCheckpoint(monitor=self.monitor, mode=monitor_mode(self.monitor), save_top_k=1,
                                                    filename="best", auto_insert_metric_name=False)]

    def on_train_start(self):
        # Methods that schedule over the run (AdaLoRA's rank budget) learn its length here.
        peft.start(self.model, max(1, int(self.trainer.estimated_stepping_batches)))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # After optimizer.step(), gradients still present (peft's documented order for AdaLoRA).
        peft.step(self.model, self.global_step - 1)

    def on_save_checkpoint(self, checkpoint):
        # Only what was trained (adapters, heads, decoders, method buffers), not the frozen backbone.
        # A sharded checkpoint (ModelParallelStrategy: one file per process) keeps everything: reading
        # it back plans over every tensor of the model.
        if sharded_state(checkpoint["state_dict"]):
            return
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
        orthogonality_weight: weight of a prototypical head's orthogonality loss (Bird-MAE: 1; other
            heads have none).
        monitor: the validation metric that picks the checkpoint tested at the end (default
            `val/acc`, multi-label `val/map`; the DINOv2 radiology recipes choose `val/auroc`).
        decay_exclude: no weight decay on biases, norms, prompts, prefixes and prototypes.
        pos_weight: multi-label BCE weight of the positives per label (a list), or "auto": the
            training split's negatives / positives per label, read from the data module's
            `pos_weight` when training starts.
        recompute: recompute each block's activations in the backward instead of keeping them
            (`shared.peft.recompute`); see benchmarks/ for what it saves and costs.
        depth_cache: off (or false), auto, fp16, bf16 or fp32: when every method adapts blocks k.. only and
            the training data has no augmentation, compute the tokens entering block k once (the stem
            and blocks below k in eval mode, no_grad), store them on disk in that dtype (auto: fp16, bf16
            under bf16 precision) and train blocks k.. + final norm + head from them
            (`shared.depth_cache`; docs/core.md, "Depth caching"). When it cannot apply, one warning
            line says why and training runs on the normal path.
        depth_cache_dir: where depth caches are kept (default ~/.cache/peft-suite/depth).
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
                 orthogonality_weight: float = 1.0, preprocessing: dict[str, Any] | None = None,
                 init_bundle: str | None = None, monitor: str | None = None, decay_exclude: bool = False,
                 pos_weight: list[float] | str | None = None, recompute: bool = False,
                 depth_cache: Literal["off", "auto", "fp16", "bf16", "fp32"] | bool = "off",
                 depth_cache_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        check_mode(depth_cache)
        if loss not in ("auto", "ce", "bce", "asl"):
            raise ValueError(f"loss must be auto, ce, bce or asl, got {loss!r}")
        if pos_weight is not None and not multilabel:
            raise ValueError("pos_weight is for multi-label training (BCE); balance single-label classes with "
                             "the data module's balanced_sampler")
        if isinstance(pos_weight, str) and pos_weight != "auto":
            raise ValueError(f"pos_weight must be a list of numbers or 'auto', got {pos_weight!r}")
        if isinstance(pos_weight, (list, tuple)) and len(pos_weight) != num_classes:
            raise ValueError(f"pos_weight has {len(pos_weight)} values for num_classes={num_classes}")
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
        if recompute:  # activation checkpointing per block: less memory, one more forward per step
            peft.recompute(self.model)
        self.multilabel = multilabel
        self.loss_kind = ("bce" if multilabel else "ce") if loss == "auto" else loss
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.metrics = torch.nn.ModuleDict({s: self._metrics(num_classes) for s in ("val", "test")})
        valid = {f"val/{k}" for k in self.metrics["val"]} | {"val/loss"}
        if monitor is not None and monitor not in valid:
            raise ValueError(f"monitor {monitor!r} is not logged by this model; choose one of {sorted(valid)}")
        self.pos_weight = (torch.tensor([float(v) for v in pos_weight])
                           if isinstance(pos_weight, (list, tuple)) else None)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the depth cache (shared.depth_cache.DepthCaching)
        if self.hparams.pos_weight == "auto" and self.pos_weight is None:
            data = getattr(self.trainer, "datamodule", None)
            weights = getattr(data, "pos_weight", None)
            if weights is None:
                raise ValueError(f"pos_weight: 'auto' needs a data module with a pos_weight property, "
                                 f"{type(data).__name__} has none")
            self.pos_weight = torch.as_tensor(weights, dtype=torch.float32)
            if len(self.pos_weight) != self.hparams.num_classes:
                raise ValueError(f"{type(data).__name__}.pos_weight has {len(self.pos_weight)} values for "
                                 f"num_classes={self.hparams.num_classes}")

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
        # AUROC / AP per class over the split, averaged over the classes that have positives and
        # negatives in it (torchmetrics' macro counts an absent class as 0); unknown multi-label
        # targets (NaN, e.g. CheXpert's uncertain labels) become -1 and are left out.
        if self.hparams.multilabel:
            return MetricCollection({"map": PerClassScore("ap"), "auroc": PerClassScore("auroc")},
                                    compute_groups=False)
        return MetricCollection({"acc": MulticlassAccuracy(c, average="micro"),
                                 "auroc": PerClassScore("auroc", binary=c == 2)})

    @property
    def monitor(self) -> str:  # noqa: D401 - overrides the base attribute
        return self.hparams.get("monitor") or ("val/map" if self.hparams.multilabel else "val/acc")

    def forward(self, inputs):
        return self.model(inputs)

    def loss(self, logits, y):
        if self.loss_kind == "ce":
            return F.cross_entropy(logits, y)
        y = y.float()
        valid = ~torch.isnan(y)  # unknown labels (CheXpert "ignore") add neither loss nor gradient
        target = torch.where(valid, y, torch.zeros_like(y))
        if self.loss_kind == "bce":
            pw = None if self.pos_weight is None else self.pos_weight.to(logits.device, logits.dtype)
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pw)
            return (loss * valid).sum() / valid.sum().clamp_min(1)
        if not valid.all():
            raise ValueError("the asymmetric loss needs known targets; use loss: bce with unknown (NaN) labels")
        return asymmetric_loss(logits, target)

    def _shared_step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        if stage != "train":  # the distributed sampler's padding counts in no loss or metric
            n = self.real(len(y))
            if n == 0:
                return None
            logits, y = logits[:n], y[:n]
        loss = self.loss(logits, y)
        if stage == "train":
            if self.hparams.orthogonality_weight and hasattr(self.model.head, "orthogonality_loss"):
                loss = loss + self.hparams.orthogonality_weight * self.model.head.orthogonality_loss()
            extra = peft.regularization(self.model)  # e.g. AdaLoRA's orthogonality penalty
            if extra is not None:
                loss = loss + extra
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        else:
            log_eval_mean(self, f"{stage}/loss", loss, len(y), prog_bar=stage != "test")
        if stage != "train":
            probs = logits.sigmoid() if self.multilabel else logits.softmax(-1)
            target = torch.nan_to_num(y.float(), nan=-1.0).int() if self.multilabel else y.long()
            self.metrics[stage].update(probs, target)
        return loss

    def _log_metrics(self, stage):
        values = self.metrics[stage].compute()  # gathered over processes by torchmetrics
        self.metrics[stage].reset()
        out, dropped = {}, {}
        for k, v in values.items():
            if isinstance(self.metrics[stage][k], PerClassScore):  # nan where a class lacks positives or negatives
                v = v.reshape(-1)  # torchmetrics squeezes a single class to a scalar
                defined = ~torch.isnan(v)
                out[f"{stage}/{k}"] = v[defined].mean() if defined.any() else torch.tensor(float("nan"))
                dropped[f"{stage}/{k}_classes_dropped"] = float((~defined).sum())
            else:
                out[f"{stage}/{k}"] = v
        # Equal on every rank already; sync_dist averages equal numbers.
        self.log_dict(out, prog_bar=True, sync_dist=True)
        self.log_dict(dropped, sync_dist=True)

    def trained_tensor_names(self) -> list[str]:
        return peft_tensor_names(self.model)

    def param_summary(self) -> dict[str, Any]:
        return peft.summary(self.model)

    def bundle_extra(self) -> dict[str, Any]:
        """Fields a bundle needs for prediction beyond the core's (task, label semantics)."""
        return {"task": "classification", "multilabel": self.multilabel}

    def bundle_domain(self) -> str | None:
        """The application the bundle is for: the package of the data it was trained on (audio,
        medical, ...); None (then `peft.save` takes the backbone's domain) outside a Trainer or
        for shared data."""
        from shared.artifacts import domain_of_module

        try:
            data = self.trainer.datamodule
        except RuntimeError:  # not attached to a Trainer
            return None
        return domain_of_module(type(data).__module__) if data is not None else None

    def save_bundle(self, path, metrics: dict[str, Any] | None = None):
        return peft.save(self.model, path, labels=self.hparams.labels, metrics=metrics,
                         preprocessing=self.hparams.preprocessing, backbone_id=self.hparams.backbone,
                         backbone_kwargs=self.hparams.backbone_kwargs, extra=self.bundle_extra(),
                         domain=self.bundle_domain())


def peft_tensor_names(model) -> list[str]:
    """Names (relative to a Classifier) of the tensors an adapter bundle stores."""
    from shared.artifacts import trained_tensors

    names = [f"backbone.{n}" for n in trained_tensors(model.backbone)]
    return names + [f"head.{n}" for n in model.head.state_dict()]
