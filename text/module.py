"""The Lightning module of the encoder path: backbone + PEFT methods + per-token BIO head.

Validation and test score whole documents (windowed), not windows: per-entity jargon decisions
(F1 of the jargon class, per reader and macro) for the PersonalizedJargon / JSONL layouts; the set
of unique extracted terms against the gold list (TermEval) for ACTER.

Extra targets (`data.extra_targets: [definition, background, example]`, passed on through the data's
preprocessing): one binary output per target on every token, trained with BCE on the words of the
entities that carry that label, scored per entity (`<stage>/<target>/f1`, ...).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from shared import backbones, peft
from shared.depth_cache import check_mode
from shared.module import PeftModule, peft_tensor_names
from text import backbone as _text_backbones  # noqa: F401  registers hf-encoder
from text.bootstrap import sentence_gold, sentence_predictions, term_bootstrap
from text.data import IGNORE, target_columns, target_name
from text.tagger import (TokenHead, decision_metrics, entity_decisions, extra_decisions, extra_metrics, extract_terms,
                         merge_windows, term_metrics, window_probs, word_outputs)


def extra_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE of the extra-target logits (B, N, K) against targets (B, N, K), averaged over the labelled
    (token, target) pairs; NaN targets (words outside labelled entities, hidden labels, padding) add
    nothing. 0 when the batch has no labelled pair."""
    valid = ~torch.isnan(targets)
    if not valid.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[valid], targets[valid].to(logits.dtype))


class TaggerModule(PeftModule):
    """Args:
        backbone: a registered BERT-class backbone (`tiny-bert`, `hf-encoder`).
        backbone_kwargs: e.g. `{checkpoint: all-MiniLM-L6-v2}`.
        methods: PEFT method configs (`[{name: lora, r: 8, targets: [query, value]}]`).
        head_dropout: dropout before the token head.
        o_weight: loss weight of the O tag (below 1 counters how rare term words are).
        extra_weight: weight of the extra targets' BCE (when the data has `extra_targets`) against the
            tagging loss.
        num_classes / labels / preprocessing: linked from the data module; `preprocessing.extra_targets`
            (set by `data.extra_targets`) adds one binary output per additional-information target.
        lr, weight_decay, betas, eps, warmup_fraction, lr_groups, decay_exclude: AdamW + cosine.
        init_bundle: start from a saved tagger bundle (e.g. the shared adapter a reader's adapter grows from).
        depth_cache: off (or false), auto, fp16, bf16 or fp32: train the adapted top blocks from cached
            inputs of the lowest adapted block (`shared.depth_cache`, docs/core.md "Depth caching"); each
            window is stored at its own length and re-padded per batch (tags with the ignore index, the
            attention mask rebuilt); validation and testing run the whole model on whole documents.
        depth_cache_dir: where depth caches are kept (default ~/.cache/peft-suite/depth).
    """

    monitor = "val/f1"

    def __init__(self, backbone: str = "tiny-bert", backbone_kwargs: dict[str, Any] | None = None,
                 methods: list[dict[str, Any]] | None = None, head_dropout: float = 0.0, o_weight: float = 1.0,
                 num_classes: int = 3, labels: list[str] | None = None, preprocessing: dict[str, Any] | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, warmup_fraction: float = 0.0, lr_groups: dict[str, float] | None = None,
                 decay_exclude: bool = False, init_bundle: str | None = None, extra_weight: float = 1.0,
                 depth_cache: Literal["off", "auto", "fp16", "bf16", "fp32"] | bool = "off",
                 depth_cache_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        check_mode(depth_cache)
        # the annotation columns (additional_definition, ...) the head predicts besides the tags
        self.extra_columns = target_columns((preprocessing or {}).get("extra_targets"))
        net = backbones.create(backbone, **(backbone_kwargs or {})).train()  # from_pretrained gives eval mode
        if init_bundle:
            self.model = peft.load(net, init_bundle)
            if not isinstance(self.model.head, TokenHead):
                raise ValueError(f"{init_bundle}: not a token-tagging bundle (its head is {type(self.model.head).__name__})")
            if self.model.head.extra_targets != self.extra_columns:
                raise ValueError(f"{init_bundle}: the bundle's extra targets {self.model.head.extra_targets} differ "
                                 f"from the data's {self.extra_columns} (data.extra_targets)")
            for p in self.model.head.parameters():
                p.requires_grad_(True)
        else:
            peft.attach(net, methods or [], backbone_id=backbone)
            head = TokenHead(backbones.anatomy(net).embed_dim, num_classes, head_dropout, self.extra_columns)
            self.model = peft.Classifier(net, head, labels=labels)
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.register_buffer("class_weight", torch.tensor([o_weight] + [1.0] * (num_classes - 1)), persistent=False)
        self.eval_losses = torch.nn.ModuleDict({f"{s}_{k}": MeanMetric() for s in ("val", "test") for k in ("tag", "extra")})

    def forward(self, inputs):
        return self.model(inputs)

    _window_rows: list | None = None  # per window of the evaluation loader, its (n_tokens, C + K) outputs

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._window_rows = []

    def doc_outputs(self, split: str, docs) -> list:
        """(n_words, C + K) per doc of `split`: from the windows the evaluation loop just scored (its loss
        pass: one forward per window, batched by length) when they cover the split, else recomputed
        (`word_outputs`: several processes, a limited number of batches, or a call outside the loop)."""
        data = self.trainer.datamodule
        rows, self._window_rows = self._window_rows, None
        jobs, order = getattr(data, "eval_plan", {}).get(split, (None, None))
        if rows is not None and jobs is not None and len(rows) == len(order) and self.trainer.world_size == 1:
            probs = [None] * len(order)
            for k, i in enumerate(order):
                probs[i] = rows[k]
            return merge_windows([len(d.words) for d in docs], jobs, probs)
        return word_outputs(self.model, data.encoder, [(d.words, d.profile) for d in docs])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, extra: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(total loss, extra-target BCE or None): tag cross-entropy + extra_weight * extra BCE."""
        c = self.hparams.num_classes
        tags = logits[..., :c]
        loss = F.cross_entropy(tags.flatten(0, 1), labels.flatten(), weight=self.class_weight.to(logits.dtype),
                               ignore_index=IGNORE)
        if not self.extra_columns:
            return loss, None
        if extra is None:
            raise ValueError(f"the model predicts extra targets {self.extra_columns} but the batch has none "
                             f"(set data.extra_targets)")
        bce = extra_loss(logits[..., c:], extra.to(logits.device))
        return loss + self.hparams.extra_weight * bce, bce

    def _shared_step(self, batch, stage: str):
        inputs, labels, *extra = batch
        logits = self(inputs)  # (B, N, 3 [+ K])
        if stage != "train":  # the distributed sampler's padding windows count in no loss
            n = self.real(len(labels))
            if n == 0:
                return None
            logits, labels, extra = logits[:n], labels[:n], [e[:n] for e in extra]
        loss, bce = self.loss(logits, labels, extra[0] if extra else None)
        if stage != "train" and self._window_rows is not None:  # kept for scoring the docs (`doc_outputs`)
            probs = window_probs(logits.detach(), self.hparams.num_classes).cpu().numpy()
            lengths = inputs["attention_mask"][:len(labels)].sum(1).tolist()
            self._window_rows += [p[:k] for p, k in zip(probs, lengths)]
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
            if bce is not None:
                self.log("train/extra_loss", bce, batch_size=len(labels))
            return loss
        # Means over the split, whatever the batches, reduced over every process (`_log_metrics`): the
        # tag loss weighs each labelled token by its class weight (as cross_entropy does within a
        # batch), the extra targets' BCE each labelled (token, target) pair; a batch without any adds nothing.
        labelled = labels[labels != IGNORE]
        if labelled.numel():
            tag = loss - self.hparams.extra_weight * bce if bce is not None else loss
            self.eval_losses[f"{stage}_tag"].update(tag.detach(), weight=float(self.class_weight[labelled].sum()))
        if bce is not None and (pairs := int((~torch.isnan(extra[0])).sum())):
            self.eval_losses[f"{stage}_extra"].update(bce.detach(), weight=pairs)
        return loss

    def evaluate(self, stage: str) -> dict[str, float]:
        data = self.trainer.datamodule
        stage = stage if data.docs(stage) else "test"
        if data.task == "terms":
            docs = data.docs(stage)
            c = self.hparams.num_classes
            probs = [o[:, :c] for o in self.doc_outputs(stage, docs)]
            terms, tags = extract_terms(self.model, data.encoder, docs, key=data.term_key, probs=probs)
            out = term_metrics(terms, data.gold_terms(stage))
            resamples = getattr(data, "bootstrap", 0)
            if stage == "test" and resamples:  # 95% intervals over the test sentences (text.bootstrap)
                gold = data.gold_terms(stage)
                pred, gold_by = sentence_predictions(docs, tags, data.term_key), sentence_gold(docs, gold, data.term_key)
                ci = term_bootstrap(pred, gold_by, gold, resamples=resamples, seed=data.seed)
                out.update({k: v for k, v in ci.items() if k not in out})
                # per sentence, for paired comparisons of runs (text.report; written by text.train as test_terms.json)
                self.test_terms = {"doc_ids": [d.doc_id for d in docs], "pred": [sorted(t) for t in pred],
                                   "gold_by_sentence": [sorted(t) for t in gold_by], "gold": sorted(gold),
                                   "term_match": data.term_match}
            return out
        docs = data.docs(stage)
        c = self.hparams.num_classes
        outputs = self.doc_outputs(stage, docs)
        out = decision_metrics(entity_decisions(self.model, data.encoder, docs, probs=[o[:, :c] for o in outputs]))
        rows = extra_decisions(docs, [o[:, c:] for o in outputs], self.extra_columns)
        for col, rs in rows.items():
            m = extra_metrics(rs)
            if stage != "test":  # validation: the headline numbers only (every epoch's log line shows them)
                m = {k: m[k] for k in ("f1", "macro_f1")}
            out.update({f"{target_name(col)}/{k}": v for k, v in m.items()})
        return out

    def _log_metrics(self, stage: str) -> None:
        # split means: torchmetrics sums value x weight and the weights over the processes (every one computes)
        tag, extra = self.eval_losses[f"{stage}_tag"], self.eval_losses[f"{stage}_extra"]
        loss = tag.compute()
        if self.extra_columns:
            extra_loss = extra.compute()
            loss = loss + self.hparams.extra_weight * extra_loss
        tag.reset()
        extra.reset()
        if self.trainer.sanity_checking:
            return
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test")
        if self.extra_columns:
            self.log(f"{stage}/extra_loss", extra_loss)
        self.log_dict({f"{stage}/{k}": float(v) for k, v in self.evaluate(stage).items()})

    def trained_tensor_names(self) -> list[str]:
        return peft_tensor_names(self.model)

    def param_summary(self) -> dict[str, Any]:
        return peft.summary(self.model)

    def save_bundle(self, path, metrics: dict[str, Any] | None = None):
        return peft.save(self.model, path, labels=self.hparams.labels, metrics=metrics,
                         preprocessing=self.hparams.preprocessing, backbone_id=self.hparams.backbone,
                         backbone_kwargs=self.hparams.backbone_kwargs,
                         extra={"task": "jargon-tagging", "domain": "text"})
