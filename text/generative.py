"""Generative path: a Llama-class causal LM asked the study's question (abstract, entity, reader
information) and answered by constrained yes / no scoring: the log-probabilities of the two answer
tokens after the prompt are compared; nothing is generated.

- prompting baselines without training (`BASELINES`): vanilla, reader metadata, reader profile (the
  reader's own labelled examples), nearest annotator (examples from the reader whose training
  labels agree most with this reader's), nearest abstract (the reader's labelled abstract closest
  to this one by BM25, `rank_bm25`);
- personalisation: LoRA through the core (`shared.peft`), one shared starting adapter trained on
  every reader, then one adapter per reader grown from it (`ReaderBank`); switching readers copies
  the reader's LoRA tensors into the loaded model (no reload), and a batch mixing readers is answered
  in ONE forward with each row through its own reader's LoRA (`ReaderBank.mixed`), equal to
  one-reader-at-a-time.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared import peft
from shared.artifacts import trained_tensors
from text.data import Doc

QUESTION = ('Question: is the term "{entity}" jargon for this reader, that is, would they need it explained '
            'to understand the abstract? Answer yes or no.\nAnswer:')
ANSWERS = (" yes", " no")
BASELINES = ("vanilla", "metadata", "profile", "nearest_annotator", "nearest_abstract")


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


# ---------------------------------------------------------------------------------------- prompts


@dataclass
class Query:
    reader: str
    profile: str
    abstract: str
    entity: str
    gold: bool | None = None
    doc_id: str = ""
    context: str = ""  # in-context examples of a baseline


def queries_of(docs: list[Doc]) -> list[Query]:
    return [Query(d.reader, d.profile, d.text or " ".join(d.words), e.text, e.jargon, d.doc_id)
            for d in docs for e in d.entities]


def prompt(q: Query, with_reader: bool = True) -> str:
    reader = f"Reader: {q.profile}\n" if with_reader and q.profile else ""
    return f"Abstract: {q.abstract}\n{reader}{q.context}" + QUESTION.format(entity=q.entity)


def examples_text(pairs: list[tuple[str, bool]], who: str = "this reader") -> str:
    if not pairs:
        return ""
    known = [t for t, j in pairs if not j]
    unknown = [t for t, j in pairs if j]
    return (f"Terms {who} knew: {', '.join(known) or 'none'}.\n"
            f"Terms {who} found to be jargon: {', '.join(unknown) or 'none'}.\n")


def with_baseline(queries: list[Query], kind: str, train: list[Query], k: int = 8, seed: int = 0) -> list[tuple[Query, bool]]:
    """(query with its context, whether the prompt names the reader) for one prompting baseline."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; one of {', '.join(BASELINES)}")
    by_reader: dict[str, list[Query]] = {}
    for t in train:
        if t.gold is not None:
            by_reader.setdefault(t.reader, []).append(t)
    out = []
    if kind == "nearest_abstract":
        from rank_bm25 import BM25Okapi

        index = {}
        for r, qs in by_reader.items():
            abstracts = sorted({q.abstract for q in qs})
            index[r] = (abstracts, BM25Okapi([a.lower().split() for a in abstracts]))
    nearest = nearest_annotators(by_reader) if kind == "nearest_annotator" else {}
    rng = random.Random(seed)
    for q in queries:
        q = copy.copy(q)
        mine = by_reader.get(q.reader, [])
        if kind == "profile":
            q.context = examples_text([(t.entity, t.gold) for t in rng.sample(mine, min(k, len(mine)))])
        elif kind == "nearest_annotator":
            other = by_reader.get(nearest.get(q.reader, ""), [])
            same = [t for t in other if t.doc_id == q.doc_id] or other
            q.context = examples_text([(t.entity, t.gold) for t in same[:k]], "a reader with a similar background")
        elif kind == "nearest_abstract" and q.reader in index:
            abstracts, bm25 = index[q.reader]
            best = abstracts[int(bm25.get_scores(q.abstract.lower().split()).argmax())]
            q.context = f"A related abstract this reader read: {best}\n" + examples_text(
                [(t.entity, t.gold) for t in mine if t.abstract == best][:k])
        out.append((q, kind != "vanilla"))
    return out


def nearest_annotators(by_reader: dict[str, list[Query]]) -> dict[str, str]:
    """Each reader's nearest other reader: the highest agreement on the (abstract, entity) pairs both labelled."""
    labels = {r: {(q.doc_id, q.entity): q.gold for q in qs} for r, qs in by_reader.items()}
    out = {}
    for r in labels:
        best, score = None, -1.0
        for o in labels:
            shared = set(labels[r]) & set(labels[o])
            if o == r or not shared:
                continue
            agree = sum(labels[r][k] == labels[o][k] for k in shared) / len(shared)
            if agree > score:
                best, score = o, agree
        if best is not None:
            out[r] = best
    return out


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

    def ids(self, q: Query, with_reader: bool = True) -> list[int]:
        ids = ([self.tok.bos_token_id] if self.tok.bos_token_id is not None else []) + \
            self.tok.encode(prompt(q, with_reader)) + self.prefix
        if len(ids) <= self.max_length:
            return ids
        return self.ids(window_abstract(q, self.tok, self.max_length, len(ids)), with_reader)

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


_ROWS: contextvars.ContextVar = contextvars.ContextVar("text_reader_rows", default=None)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


class ReaderBank:
    """One LoRA per reader on ONE loaded model (attached through `shared.peft`).

    `use(reader)` copies that reader's tensors into the model's LoRA (no reload); `mixed(readers)`
    is a context in which one forward answers each row with its own reader's LoRA: every LoRA layer
    then computes base(x) + B_r(A_r(x)) * scaling per group of rows, the same sum the layer computes
    when reader r is loaded. The reader of each row travels in a context variable, not on a module,
    so concurrent calls (threads) do not see each other's readers.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self.layers = lora_layers(model)
        if not self.layers:
            raise ValueError("the model has no LoRA layers: attach peft.LoRA through shared.peft first")
        for name, layer in self.layers.items():
            layer.register_forward_hook(self._hook(name), with_kwargs=True)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in trained_tensors(self.model).items()}

    def add(self, reader: str, state: dict[str, torch.Tensor] | None = None) -> None:
        self.states[reader] = {k: v.detach().clone() for k, v in (state or self.snapshot()).items()}

    def use(self, reader: str) -> None:
        if reader not in self.states:
            raise ValueError(f"unknown reader {reader!r}; adapters exist for {', '.join(self.states) or 'nobody'}")
        live = trained_tensors(self.model)
        with torch.no_grad():
            for k, v in self.states[reader].items():
                live[k].copy_(v)

    def _weights(self, reader: str, name: str, key: str):
        s = self.states[reader]
        return s[f"{name}.lora_A.{key}.weight"], s[f"{name}.lora_B.{key}.weight"]

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            rows = _ROWS.get()
            if rows is None:
                return None  # the loaded reader (or the shared adapter) answers
            x = args[0]
            out = module.base_layer(x)
            (key,) = module.lora_A.keys()  # the core attaches one LoRA adapter per layer
            scaling = module.scaling[key]
            for reader, idx in rows:
                a, b = self._weights(reader, name, key)
                xs = x[idx].to(a.dtype)
                out[idx] = out[idx] + F.linear(F.linear(xs, a.to(x.device)), b.to(x.device)) * scaling
            return out
        return hook

    @contextlib.contextmanager
    def mixed(self, readers: list[str]):
        unknown = sorted(set(readers) - set(self.states))
        if unknown:
            raise ValueError(f"unknown reader(s) {unknown}; adapters exist for {', '.join(self.states)}")
        groups = {}
        for i, r in enumerate(readers):
            groups.setdefault(r, []).append(i)
        token = _ROWS.set([(r, torch.tensor(ix)) for r, ix in groups.items()])
        try:
            yield
        finally:
            _ROWS.reset(token)


def train_yes_no(scorer: YesNoScorer, items: list[tuple[Query, bool]], steps: int, lr: float = 1e-3,
                 batch_size: int = 8, seed: int = 0) -> list[float]:
    """Train the attached LoRA on yes / no answers: cross-entropy over the two answer tokens."""
    labelled = [(q, w) for q, w in items if q.gold is not None]
    if not labelled:
        raise ValueError("no labelled queries to train on")
    params = [p for p in scorer.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    scorer.model.train()
    losses = []
    for _ in range(steps):
        chunk = rng.sample(labelled, min(batch_size, len(labelled)))
        margin = scorer.margins(scorer.batch(chunk))
        target = torch.tensor([float(q.gold) for q, _ in chunk], device=margin.device)
        loss = F.binary_cross_entropy_with_logits(margin, target)  # softmax over {yes, no} = sigmoid(margin)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    scorer.model.eval()
    return losses


def personalise(scorer: YesNoScorer, train: list[Query], shared_steps: int, reader_steps: int, lr: float = 1e-3,
                batch_size: int = 8, seed: int = 0) -> ReaderBank:
    """The shared starting adapter (all readers' training queries), then one adapter per reader from it."""
    bank = ReaderBank(scorer.model)
    if shared_steps:
        train_yes_no(scorer, [(q, True) for q in train], shared_steps, lr, batch_size, seed)
    start = bank.snapshot()
    bank.add("__shared__", start)
    for reader in sorted({q.reader for q in train}):
        bank.use("__shared__")
        mine = [(q, True) for q in train if q.reader == reader]
        if reader_steps and any(q.gold is not None for q, _ in mine):
            train_yes_no(scorer, mine, reader_steps, lr, batch_size, seed)
        bank.add(reader)
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


def attach_lora(model: nn.Module, r: int = 8, alpha: int = 16, targets=("q_proj", "v_proj"), backbone_id: str | None = None):
    return peft.attach(model, [peft.LoRA(r=r, alpha=alpha, targets=list(targets))], backbone_id=backbone_id)
