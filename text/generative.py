"""Generative path: a Llama-class causal LM asked the study's question (abstract, entity, reader
information) and answered by constrained yes / no scoring: the log-probabilities of the two answer
tokens after the prompt are compared; nothing is generated.

- the prompt and the prompting baselines without training live in `text.prompts`;
- personalisation: LoRA through the core (`shared.peft`), one shared starting adapter trained on
  every reader, then one adapter per reader grown from it (`ReaderBank`); switching readers copies
  the reader's LoRA tensors into the loaded model (no reload), and a batch mixing readers is answered
  in ONE forward with each row through its own reader's LoRA (`ReaderBank.mixed`, served by the core's
  `peft.AdapterBank`: the readers' LoRA tensors stacked, one batched matmul per layer), equal to
  one-reader-at-a-time;
- shared-prefix scoring and training (`YesNoScorer.score_shared`, `train_yes_no(shared_prefix=True)`):
  the prompt is split before the entity, so the terms asked about one abstract for one reader share
  one forward of the head (its keys / values cached), then their short tails go in one batch;
- bundles (`save_bundle` / `load_bundle`): the shared adapter and each reader's as `shared.peft`
  bundles (task `jargon-yes-no`) that `python -m text.predict` loads; the CLI that trains and saves
  them all is `python -m text.personalise`.
"""
from __future__ import annotations

import contextlib
import inspect
import random
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from shared import peft
from text.prompts import Query, prompt_parts

ANSWERS = (" yes", " no")
TASK = "jargon-yes-no"  # the bundle task of this path
SHARED = "__shared__"  # the bank's name for the shared starting adapter


# ------------------------------------------------------------------------------------ tokenizers


class ByteTokenizer:
    """UTF-8 bytes as ids (3 + byte), BOS 1, pad 0: no vocabulary file (tests, tiny random LMs)."""

    pad_token_id, bos_token_id, vocab_size = 0, 1, 259

    def encode(self, text: str) -> list[int]:
        return [3 + b for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", "replace")


class HFCausalTokenizer:
    def __init__(self, tok):
        self.tok = tok
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)


def answer_ids(tok) -> tuple[list[int], int, int]:
    """(shared prefix, yes token, no token): the tokens " yes" and " no" share (e.g. a space byte) are
    appended to the prompt; the first tokens where they differ are the two compared answers."""
    yes, no = tok.encode(ANSWERS[0]), tok.encode(ANSWERS[1])
    k = 0
    while k < min(len(yes), len(no)) and yes[k] == no[k]:
        k += 1
    if k == min(len(yes), len(no)):
        raise ValueError("the tokenizer encodes ' yes' and ' no' so that one is a prefix of the other")
    return yes[:k], yes[k], no[k]


# ------------------------------------------------------------------------------------- scoring


class YesNoScorer:
    """Batches prompts (right-padded) and returns log P(yes) - log P(no) at the last prompt token.
    Prompts longer than `max_length` keep the question and as much of the abstract as fits around
    the entity: `window_abstract` cuts the ABSTRACT into a window centred on the entity's first
    occurrence, never the question (the decision needs both)."""

    def __init__(self, model: nn.Module, tok, max_length: int | None = None):
        self.model, self.tok = model, tok
        cfg = getattr(model, "config", None)
        self.max_length = max_length or getattr(cfg, "max_position_embeddings", 2048)
        self.prefix, self.yes, self.no = answer_ids(tok)

    def parts(self, q: Query, with_reader: bool = True) -> tuple[list[int], list[int]]:
        """(head ids, tail ids) of the prompt (see `prompt_parts`), each part tokenized on its own so
        that queries sharing a head share its tokens; the tail ends with the answers' shared prefix."""
        head, tail = prompt_parts(q, with_reader)
        h = ([self.tok.bos_token_id] if self.tok.bos_token_id is not None else []) + self.tok.encode(head)
        t = self.tok.encode(tail) + self.prefix
        if len(h) + len(t) <= self.max_length:
            return h, t
        return self.parts(window_abstract(q, self.tok, self.max_length, len(h) + len(t)), with_reader)

    def ids(self, q: Query, with_reader: bool = True) -> list[int]:
        h, t = self.parts(q, with_reader)
        return h + t

    def batch(self, items: list[tuple[Query, bool]]) -> dict[str, torch.Tensor]:
        seqs = [self.ids(q, w) for q, w in items]
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        return {"input_ids": ids, "attention_mask": mask}

    def margins(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) log P(yes) - log P(no) at each row's last real token."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = self.model(**batch).logits  # (B, N, V)
        last = batch["attention_mask"].sum(1) - 1
        logp = logits[torch.arange(len(last), device=device), last].float().log_softmax(-1)
        return logp[:, self.yes] - logp[:, self.no]

    @torch.no_grad()
    def score(self, items: list[tuple[Query, bool]], batch_size: int = 16) -> list[float]:
        self.model.eval()
        return [float(m) for i in range(0, len(items), batch_size)
                for m in self.margins(self.batch(items[i:i + batch_size]))]

    # -- shared-prefix scoring: one forward of a group's head, then its entities' tails in a batch

    def _call(self, **kw):
        """The model's forward with the KV cache argument under this transformers' name."""
        if self._cache_arg is None:
            params = inspect.signature(self.model.forward).parameters
            self._cache_arg = "cache" if "cache" in params else "past_key_values"
            self._keep = "logits_to_keep" in params
        if "cache" in kw:
            kw[self._cache_arg] = kw.pop("cache")
        if not self._keep:
            kw.pop("logits_to_keep", None)
        return self.model(**kw)

    _cache_arg: str | None = None
    _keep = False

    def margins_shared(self, head: list[int], tails: list[list[int]]) -> torch.Tensor:
        """(k,) log P(yes) - log P(no) of the prompts head + tails[i]: the head goes through the model
        ONCE (its keys / values cached and repeated for the k tails), the tails in one batch. Equal to
        `margins` on the full prompts up to float rounding; gradients flow through both passes."""
        device = next(self.model.parameters()).device
        k, n = len(tails), max(map(len, tails))
        if not head or n == 0:
            raise ValueError("shared-prefix scoring needs a non-empty head and non-empty tails")
        out = self._call(input_ids=torch.tensor([head], device=device), use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            raise ValueError(f"{type(self.model).__name__} returns no repeatable KV cache; use score / margins")
        cache.batch_repeat_interleave(k)
        ids = torch.full((k, n), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((k, len(head) + n), dtype=torch.long)
        mask[:, :len(head)] = 1
        for i, t in enumerate(tails):
            ids[i, :len(t)] = torch.tensor(t)
            mask[i, len(head):len(head) + len(t)] = 1
        last = torch.tensor([len(t) - 1 for t in tails])
        keep = torch.unique(last)  # sorted: the positions whose logits are needed
        logits = self._call(input_ids=ids.to(device), attention_mask=mask.to(device), cache=cache,
                            logits_to_keep=keep.to(device) if self._keep else 0).logits
        pos = torch.searchsorted(keep, last) if self._keep else last
        logp = logits[torch.arange(k, device=device), pos.to(device)].float().log_softmax(-1)
        return logp[:, self.yes] - logp[:, self.no]

    def groups(self, items: list[tuple[Query, bool]]) -> dict[tuple[int, ...], list[tuple[int, list[int]]]]:
        """Items by prompt head: {head ids: [(item index, tail ids)]}, in first-seen order."""
        out: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (q, w) in enumerate(items):
            h, t = self.parts(q, w)
            out.setdefault(tuple(h), []).append((i, t))
        return out

    @torch.no_grad()
    def score_shared(self, items: list[tuple[Query, bool]], batch_size: int = 16) -> list[float]:
        """`score` through `margins_shared`: the queries on one abstract (same reader line and
        context) share one forward of their head; identical prompts are scored once."""
        self.model.eval()
        out = [0.0] * len(items)
        for head, members in self.groups(items).items():
            tails = list(dict.fromkeys(tuple(t) for _, t in members))  # identical prompts: once
            got = {}
            for j in range(0, len(tails), batch_size):
                chunk = tails[j:j + batch_size]
                got.update(zip(chunk, map(float, self.margins_shared(list(head), [list(t) for t in chunk]))))
            for i, t in members:
                out[i] = got[tuple(t)]
        return out


def window_abstract(q: Query, tok, max_length: int, length: int) -> Query:
    words = q.abstract.split()
    over = length - max_length
    if over <= 0:
        return q
    keep = max(1, len(words) - int(over * len(words) / max(1, len(tok.encode(q.abstract)))) - 8)
    if keep >= len(words):
        keep = len(words) - 1
    low = [w.lower() for w in words]
    first = next((i for i, w in enumerate(low) if q.entity.lower().split()[0] in w), 0)
    start = min(max(0, first - keep // 2), len(words) - keep)
    if keep < len(q.entity.split()) + 2:
        raise ValueError(f"the prompt for {q.entity!r} does not fit the model's {max_length} tokens even with "
                         f"the abstract cut to the entity")
    return Query(q.reader, q.profile, "... " + " ".join(words[start:start + keep]) + " ...", q.entity, q.gold, q.doc_id, q.context)


def decisions(scores: list[float], queries: list[Query], threshold: float = 0.0) -> list[dict[str, Any]]:
    return [{"reader": q.reader, "doc": q.doc_id, "entity": q.entity, "gold": bool(q.gold), "score": s,
             "pred": s > threshold} for s, q in zip(scores, queries) if q.gold is not None]


# ------------------------------------------------------------------------------- per-reader LoRA


class ReaderBank:
    """One LoRA per reader on ONE loaded model (attached through `shared.peft`), held by the core's
    `peft.AdapterBank`.

    `use(reader)` copies that reader's tensors into the model's LoRA (no reload); `mixed(readers)` is
    a context in which one forward answers each row with its own reader's LoRA: every LoRA layer then
    computes base(x) + s B_r A_r x with the readers' stacked tensors gathered per row (one batched
    matmul per layer), the sum the layer computes when reader r is loaded. The reader of each row
    travels in a context variable, not on a module, so concurrent calls (threads) do not see each
    other's readers.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        if not any(isinstance(m, peft.LoRA) for _, m in getattr(model, "peft_state", peft.PeftState()).methods):
            raise ValueError("the model has no LoRA layers: attach peft.LoRA through shared.peft first")
        self.bank = peft.AdapterBank(model)

    @property
    def states(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.bank.states

    def snapshot(self) -> dict[str, torch.Tensor]:
        return self.bank.snapshot()

    def add(self, reader: str, state: dict[str, torch.Tensor] | None = None) -> None:
        self.bank.add(reader, state)

    def _known(self, readers) -> None:
        unknown = sorted(set(readers) - set(self.states))
        if unknown:
            raise ValueError(f"unknown reader(s) {unknown}; adapters exist for {', '.join(self.states) or 'nobody'}")

    def use(self, reader: str) -> None:
        self._known([reader])
        self.bank.use(reader)

    @contextlib.contextmanager
    def mixed(self, readers: list[str]):
        self._known(readers)
        with self.bank.rows(list(readers)):
            yield


def train_yes_no(scorer: YesNoScorer, items: list[tuple[Query, bool]], steps: int, lr: float = 1e-3,
                 batch_size: int = 8, seed: int = 0, shared_prefix: bool = False,
                 group_size: int | None = None) -> list[float]:
    """Train the attached LoRA on yes / no answers: cross-entropy over the two answer tokens.

    `shared_prefix`: a step takes groups of queries sharing a prompt head (one abstract, one reader)
    in a seeded shuffled order, at most `group_size` queries of each (default: as many as fit), up
    to `batch_size` queries; each group goes through `margins_shared` (its head once). A small
    `group_size` mixes abstracts in a step (one abstract's labels for one reader are often alike).
    Else a step is `batch_size` queries sampled at random."""
    labelled = [(q, w) for q, w in items if q.gold is not None]
    if not labelled:
        raise ValueError("no labelled queries to train on")
    params = [p for p in scorer.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    by_head = scorer.groups(labelled) if shared_prefix else {}
    heads = list(by_head)
    groups = [[(labelled[i][0], t) for i, t in members] for members in by_head.values()]
    order: list[int] = []
    scorer.model.train()
    losses = []
    for _ in range(steps):
        if shared_prefix:
            margins, golds, room, used = [], [], batch_size, set()
            while room > 0 and len(used) < len(groups):  # each group at most once a step
                if not order:
                    order = rng.sample(range(len(groups)), len(groups))
                g = order.pop()
                if g in used:
                    continue
                used.add(g)
                members = rng.sample(groups[g], min(room, len(groups[g]), group_size or room))
                margins.append(scorer.margins_shared(list(heads[g]), [t for _, t in members]))
                golds += [float(q.gold) for q, _ in members]
                room -= len(members)
            margin = torch.cat(margins)
        else:
            chunk = rng.sample(labelled, min(batch_size, len(labelled)))
            margin = scorer.margins(scorer.batch(chunk))
            golds = [float(q.gold) for q, _ in chunk]
        target = torch.tensor(golds, device=margin.device)
        loss = F.binary_cross_entropy_with_logits(margin, target)  # softmax over {yes, no} = sigmoid(margin)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    scorer.model.eval()
    return losses


def personalise(scorer: YesNoScorer, train: list[Query], shared_steps: int, reader_steps: int, lr: float = 1e-3,
                batch_size: int = 8, seed: int = 0, shared_prefix: bool = False,
                log: dict[str, Any] | None = None, group_size: int | None = None,
                done: dict[str, dict[str, torch.Tensor]] | None = None,
                on_unit: Callable[[ReaderBank, dict[str, Any]], None] | None = None) -> ReaderBank:
    """The shared starting adapter (all readers' training queries), then one adapter per reader from it.
    `log`, if given, receives the losses and wall seconds: shared_s, shared_losses, readers_s,
    reader_s / reader_losses per reader.

    Resuming (`text.personalise --resume`): `on_unit(bank, log)` is called after the shared adapter and after
    each reader's; `done` ({adapter name: tensors}, from `bank.states` at such a point, with `log` as it was
    then) skips the adapters already trained. Each adapter's training depends only on the shared adapter and
    the seed, so a resumed run trains the rest exactly as an uninterrupted one."""
    log = {} if log is None else log
    done = done or {}
    bank = ReaderBank(scorer.model)

    def restore(name: str) -> None:  # a finished adapter of the stopped run, into the model and the bank
        from shared.artifacts import trained_tensors

        live = trained_tensors(bank.bank.backbone)
        with torch.no_grad():
            for k, v in done[name].items():
                live[k].copy_(v)
        bank.add(name)

    if SHARED in done:
        restore(SHARED)
    else:
        t0 = time.perf_counter()
        log["shared_losses"] = train_yes_no(scorer, [(q, True) for q in train], shared_steps, lr, batch_size, seed,
                                            shared_prefix, group_size) if shared_steps else []
        log["shared_s"] = time.perf_counter() - t0
        bank.add(SHARED, bank.snapshot())
        if on_unit is not None:
            on_unit(bank, log)
    log.setdefault("reader_s", {})
    log.setdefault("reader_losses", {})
    for reader in sorted({q.reader for q in train}):
        if reader in done:
            restore(reader)
            continue
        t = time.perf_counter()
        bank.use(SHARED)
        mine = [(q, True) for q in train if q.reader == reader]
        if reader_steps and any(q.gold is not None for q, _ in mine):
            log["reader_losses"][reader] = train_yes_no(scorer, mine, reader_steps, lr, batch_size, seed, shared_prefix,
                                                          group_size)
        bank.add(reader)
        log["reader_s"][reader] = time.perf_counter() - t
        if on_unit is not None:
            on_unit(bank, log)
    log["readers_s"] = sum(log["reader_s"].values())
    return bank


def score_readers(scorer: YesNoScorer, bank: ReaderBank, queries: list[Query], batch_size: int = 16) -> list[float]:
    """Each query through its own reader's adapter, batches mixing readers (one forward per batch)."""
    out = []
    items = [(q, True) for q in queries]
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        with bank.mixed([q.reader for q, _ in chunk]):
            out += scorer.score(chunk, batch_size)
    return out


def score_by_reader(scorer: YesNoScorer, bank: ReaderBank, queries: list[Query], batch_size: int = 16,
                    shared_prefix: bool = True) -> list[float]:
    """Each query through its own reader's adapter, one reader at a time (`bank.use`, no reload):
    with `shared_prefix` each abstract's head is computed once per reader. Same answers as
    `score_readers` up to float rounding."""
    out = [0.0] * len(queries)
    for reader in sorted({q.reader for q in queries}):
        bank.use(reader)
        idx = [i for i, q in enumerate(queries) if q.reader == reader]
        items = [(queries[i], True) for i in idx]
        got = scorer.score_shared(items, batch_size) if shared_prefix else scorer.score(items, batch_size)
        for i, v in zip(idx, got):
            out[i] = v
    return out


def attach_lora(model: nn.Module, r: int = 8, alpha: int = 16, targets=("q_proj", "v_proj"), backbone_id: str | None = None):
    """LoRA on `targets`: module names, or one regex string matched against full module names."""
    targets = targets if isinstance(targets, str) else list(targets)
    return peft.attach(model, [peft.LoRA(r=r, alpha=alpha, targets=targets)], backbone_id=backbone_id)


# ------------------------------------------------------------------------------------- bundles



def tokenizer_spec(backbone: str, checkpoint: str | None = None, gguf_file: str | None = None) -> dict[str, Any]:
    """How a bundle rebuilds its tokenizer: the byte tokenizer for `tiny-*` LMs, else the checkpoint's."""
    if backbone.startswith("tiny-"):
        return {"kind": "byte"}
    spec = {"kind": "hf", "checkpoint": checkpoint or "smollm2-135m"}
    if gguf_file:
        spec["gguf_file"] = gguf_file
    return spec


def build_tokenizer(spec: dict[str, Any] | None):
    spec = spec or {"kind": "byte"}
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    if spec.get("kind") != "hf":
        raise ValueError(f"unknown tokenizer kind {spec.get('kind')!r} (byte or hf)")
    from transformers import AutoTokenizer

    from text.backbone import resolve_checkpoint, smollm2_gguf

    checkpoint, gguf = spec.get("checkpoint"), spec.get("gguf_file")
    if checkpoint == "smollm2-135m":
        checkpoint, gguf = smollm2_gguf()
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        return HFCausalTokenizer(AutoTokenizer.from_pretrained(resolve_checkpoint(checkpoint), **kw))
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer of {checkpoint!r}: cannot load it ({str(e).splitlines()[0]})") from None


def save_bundle(model: nn.Module, path, reader: str, profiles: dict[str, str], preprocessing: dict[str, Any],
                backbone_id: str | None = None, backbone_kwargs: dict[str, Any] | None = None,
                metrics: dict[str, Any] | None = None):
    """The LoRA now loaded in `model` as an adapter bundle (`shared.peft.save`, atomic) for `reader`
    (`SHARED` for the shared adapter); `profiles` are the reader lines the prompts used."""
    return peft.save(model, path, metrics=metrics, preprocessing={**preprocessing, "readers": dict(profiles)},
                     backbone_id=backbone_id, backbone_kwargs=backbone_kwargs,
                     extra={"task": TASK, "domain": "text", "reader": reader})


def load_bundle(path) -> tuple[YesNoScorer, dict[str, Any]]:
    """(scorer on the rebuilt backbone with the bundle's LoRA, the bundle's json)."""
    meta = peft.read_meta(path)
    if meta.get("task") != TASK:
        raise ValueError(f"{path}: not a generative jargon bundle (task {meta.get('task')!r}); train one with "
                         f"python -m text.personalise")
    prep = meta.get("preprocessing") or {}
    model = peft.from_bundle(path).eval()
    return YesNoScorer(model, build_tokenizer(prep.get("tokenizer")), prep.get("max_length")), meta
