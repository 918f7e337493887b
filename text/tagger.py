"""Encoder path: a BERT-class encoder + a per-token BIO head, trained with the core's PEFT methods.

Texts are split into words (`text.words`); a tokenizer maps each word to subword ids; the reader's
profile (if any) is the first segment, the text the second. A text longer than the model's context
is cut into overlapping windows of whole words and every word takes its prediction from the window
where it sits farthest from an edge: nothing is truncated.
"""
from __future__ import annotations

import functools
import hashlib
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared import heads
from text.data import B, I, IGNORE, O, Doc, doc_terms, spans_of
from text.words import term_key

# ------------------------------------------------------------------------------------ tokenizers


class HashTokenizer:
    """One id per lower-cased word by a stable hash: needs no vocabulary file (offline demo, tests)."""

    pad_id, cls_id, sep_id = 0, 1, 2

    def __init__(self, vocab_size: int = 1024):
        if vocab_size < 16:
            raise ValueError(f"tokenizer.vocab_size must be at least 16, got {vocab_size}")
        self.vocab_size = vocab_size

    def word_ids(self, word: str) -> list[int]:
        h = int.from_bytes(hashlib.blake2b(word.lower().encode(), digest_size=8).digest(), "little")
        return [4 + h % (self.vocab_size - 4)]

    def config(self) -> dict[str, Any]:
        return {"kind": "hash", "vocab_size": self.vocab_size}


class HFTokenizer:
    """A transformers tokenizer (WordPiece for BERT / MiniLM), applied word by word."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        from text.backbone import resolve_checkpoint

        self.path = path
        self.tok = AutoTokenizer.from_pretrained(str(resolve_checkpoint(path)))
        self.pad_id, self.cls_id, self.sep_id = self.tok.pad_token_id, self.tok.cls_token_id, self.tok.sep_token_id
        self.vocab_size = len(self.tok)
        self.word_ids = functools.lru_cache(maxsize=200_000)(self._word_ids)

    def _word_ids(self, word: str) -> list[int]:
        return self.tok.encode(word, add_special_tokens=False) or [self.tok.unk_token_id]

    def config(self) -> dict[str, Any]:
        return {"kind": "hf", "path": self.path}


def build_tokenizer(cfg: dict[str, Any]):
    cfg = dict(cfg or {"kind": "hash"})
    kind = cfg.pop("kind", "hash")
    if kind == "hash":
        return HashTokenizer(**cfg)
    if kind == "hf":
        return HFTokenizer(**cfg)
    raise ValueError(f"tokenizer.kind must be 'hash' or 'hf', got {kind!r}")


# ------------------------------------------------------------------------------------- windows


@dataclass
class Window:
    input_ids: list[int]
    token_type_ids: list[int]
    positions: list[int]  # token position of each word's first subword, for words[start:end]
    start: int
    end: int
    labels: list[int]
    extra: list[list[float]] | None = None  # per token, one target per extra target (NaN: no label)


class WindowEncoder:
    """Encode (profile, words) into windows of at most `max_length` tokens, `overlap` words shared
    between neighbours."""

    def __init__(self, tokenizer, max_length: int = 128, overlap: int = 16, reader_prefix: bool = True):
        self.tok, self.max_length, self.overlap, self.reader_prefix = tokenizer, max_length, overlap, reader_prefix

    def prefix_ids(self, profile: str) -> list[int]:
        from text.words import split_words

        if not (self.reader_prefix and profile):
            return []
        ids = [i for w in split_words(profile) for i in self.tok.word_ids(w.text)]
        if len(ids) + 3 > self.max_length // 2:
            raise ValueError(f"the reader profile {profile[:60]!r}... takes {len(ids)} tokens, more than half of "
                             f"max_length={self.max_length}; shorten it or raise data.max_length")
        return ids

    def encode(self, words: list[str], profile: str = "", tags: list[int] | None = None,
               extra: list[list[float]] | None = None) -> list[Window]:
        """`tags`: per-word BIO tags; `extra`: per-word extra targets (`Doc.extra_tags`), or None."""
        if not words:
            raise ValueError("empty text: nothing to tag")
        pre = self.prefix_ids(profile)
        head = [self.tok.cls_id] + pre + ([self.tok.sep_id] if pre else [])
        budget = self.max_length - len(head) - 1
        pieces = [self.tok.word_ids(w)[:budget] for w in words]
        windows, start = [], 0
        while True:
            end, used = start, 0
            while end < len(words) and used + len(pieces[end]) <= budget:
                used += len(pieces[end])
                end += 1
            ids, pos, types = list(head), [], [0] * len(head)
            for p in pieces[start:end]:
                pos.append(len(ids))
                ids += p
            ids.append(self.tok.sep_id)
            types += [1 if pre else 0] * (len(ids) - len(types))
            labels = [IGNORE] * len(ids)
            if tags is not None:
                for k, t in zip(pos, tags[start:end]):
                    labels[k] = t
            targets = None
            if extra is not None:
                width = len(extra[0]) if extra else 0
                targets = [[float("nan")] * width for _ in ids]
                for k, t in zip(pos, extra[start:end]):
                    targets[k] = list(t)
            windows.append(Window(ids, types, pos, start, end, labels, targets))
            if end >= len(words):
                return windows
            start = max(start + 1, end - self.overlap)


def collate(windows: list[Window], pad_id: int) -> tuple:
    """(inputs, labels (B, N)), and the extra targets (B, N, K) as a third item (NaN: no label) when the
    windows carry them."""
    n = max(len(w.input_ids) for w in windows)
    ids = torch.full((len(windows), n), pad_id, dtype=torch.long)
    types = torch.zeros((len(windows), n), dtype=torch.long)
    mask = torch.zeros((len(windows), n), dtype=torch.long)
    labels = torch.full((len(windows), n), IGNORE, dtype=torch.long)
    for i, w in enumerate(windows):
        k = len(w.input_ids)
        ids[i, :k], types[i, :k], mask[i, :k] = torch.tensor(w.input_ids), torch.tensor(w.token_type_ids), 1
        labels[i, :k] = torch.tensor(w.labels)
    inputs = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    if windows[0].extra is None:
        return inputs, labels
    extra = torch.full((len(windows), n, len(windows[0].extra[0])), float("nan"))
    for i, w in enumerate(windows):
        extra[i, :len(w.extra)] = torch.tensor(w.extra, dtype=torch.float32).reshape(len(w.extra), -1)
    return inputs, labels, extra


# ------------------------------------------------------------------------------------------ head


class TokenHead(nn.Module):
    """Per-token logits (B, N, C) from the backbone's tokens (every position, prefix included).

    With `extra_targets` (e.g. the additional-information labels `additional_definition`, ...), one
    binary logit per extra target follows the C tag logits: (B, N, C + K). They come from their own
    linear layer (`head.extra`), so a head without extra targets has exactly the tensors it had before.
    """

    def __init__(self, dim: int, num_classes: int = 3, dropout: float = 0.0, extra_targets: list[str] | None = None):
        super().__init__()
        self.dim, self.num_classes, self.dropout = dim, num_classes, dropout
        self.extra_targets = list(extra_targets or [])
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        heads._init_classifier(self.fc)
        if self.extra_targets:
            self.extra = nn.Linear(dim, len(self.extra_targets))
            heads._init_classifier(self.extra)

    def forward(self, tokens) -> torch.Tensor:
        x = self.drop(tokens.x)
        if not self.extra_targets:
            return self.fc(x)  # (B, N, C)
        return torch.cat([self.fc(x), self.extra(x)], -1)  # (B, N, C + K)

    def config(self) -> dict:
        cfg = {"kind": "token", "dim": self.dim, "num_classes": self.num_classes, "dropout": self.dropout}
        if self.extra_targets:
            cfg["extra_targets"] = list(self.extra_targets)
        return cfg


heads.HEADS.setdefault("token", TokenHead)  # bundles with a token head load through shared.heads.build_head


# ---------------------------------------------------------------------------- prediction, metrics


def num_tags(model: nn.Module) -> int:
    return getattr(getattr(model, "head", None), "num_classes", 3)


def word_probs(model: nn.Module, encoder: WindowEncoder, docs: list[tuple[list[str], str]],
               batch_size: int = 32) -> list[np.ndarray]:
    """(n_words, 3) tag probabilities for each (words, profile); long texts are windowed."""
    c = num_tags(model)
    return [p[:, :c] for p in word_outputs(model, encoder, docs, batch_size)]


def window_probs(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, N, C + K) logits -> the C tag probabilities (softmax), then one probability per extra target
    (sigmoid), in float32."""
    logits = logits.float()
    return torch.cat([logits[..., :num_classes].softmax(-1), logits[..., num_classes:].sigmoid()], -1)


@torch.no_grad()
def window_outputs(model: nn.Module, windows: list[Window], pad_id: int, batch_size: int = 32) -> list[np.ndarray]:
    """Per window, (n_tokens, C + K) probabilities (`window_probs`). The windows are batched in order
    of length, so a batch pads to about its own length (ACTER: a quarter of the tokens an
    unsorted batch pads to); each window's rows come back in the given order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    c = num_tags(model)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids))
    out: list[np.ndarray] = [None] * len(windows)  # type: ignore[list-item]
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        inputs = collate([windows[j] for j in chunk], pad_id)[0]
        probs = window_probs(model({k: v.to(device) for k, v in inputs.items()}), c).cpu().numpy()
        for row, j in enumerate(chunk):
            out[j] = probs[row, :len(windows[j].input_ids)]
    model.train(was_training)
    return out


def merge_windows(lengths: list[int], jobs: list[tuple[int, Window]], probs: list[np.ndarray]) -> list[np.ndarray]:
    """Per doc of `lengths[d]` words, (n_words, C + K): each word takes its row from the window (`jobs`:
    (doc index, window), in the docs' order) where it sits farthest from an edge; on a tie, the
    earlier window. `probs`: each job's window rows (`window_outputs`)."""
    out: list[np.ndarray] = [None] * len(lengths)  # type: ignore[list-item]
    best = [np.full(n, -1) for n in lengths]  # each word's distance to its window's edge
    for (d, w), p in zip(jobs, probs):
        if out[d] is None:
            out[d] = np.zeros((lengths[d], p.shape[-1]), dtype=np.float32)
        for j, pos in enumerate(w.positions):
            word = w.start + j
            centre = min(j, len(w.positions) - 1 - j) if w.end < lengths[d] or w.start > 0 else 10**9
            if centre > best[d][word]:
                best[d][word], out[d][word] = centre, p[pos]
    return out


def word_outputs(model: nn.Module, encoder: WindowEncoder, docs: list[tuple[list[str], str]],
                 batch_size: int = 32) -> list[np.ndarray]:
    """(n_words, C + K) for each (words, profile): the C tag probabilities (softmax), then one
    probability per extra target of the head (sigmoid); long texts are windowed (`merge_windows`)."""
    jobs = [(d, w) for d, (words, profile) in enumerate(docs) for w in encoder.encode(words, profile)]
    probs = window_outputs(model, [w for _, w in jobs], encoder.tok.pad_id, batch_size)
    return merge_windows([len(words) for words, _ in docs], jobs, probs)


def decode(probs: np.ndarray) -> list[int]:
    return probs.argmax(-1).tolist()


def span_score(probs: np.ndarray, span: tuple[int, int]) -> float:
    """How much the model holds a span to be one term: mean P(B or I) over its words."""
    s, t = span
    return float((probs[s:t, B] + probs[s:t, I]).mean())


def entity_score(probs: np.ndarray, spans: list[tuple[int, int]]) -> float:
    return max(span_score(probs, sp) for sp in spans)


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, F1 of the positive class; a 0 / 0 ratio is 0 (sklearn's `zero_division=0`,
    its default result), so a reader with no jargon held out and none predicted scores F1 0."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def entity_decisions(model, encoder, docs: list[Doc], threshold: float = 0.5,
                     probs: list[np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One row per labelled (reader, abstract, entity): gold, score, predicted. `probs`: the docs'
    word tag probabilities when already computed."""
    probs = word_probs(model, encoder, [(d.words, d.profile) for d in docs]) if probs is None else probs
    rows = []
    for d, p in zip(docs, probs):
        for e in d.entities:
            if e.jargon is None:
                continue
            s = entity_score(p, e.spans)
            rows.append({"reader": d.reader, "doc": d.doc_id, "entity": e.text, "gold": bool(e.jargon),
                         "score": s, "pred": s >= threshold})
    return rows


def extra_decisions(docs: list[Doc], probs: list[np.ndarray], columns: list[str],
                    threshold: float = 0.5) -> dict[str, list[dict[str, Any]]]:
    """Per extra target (annotation column), one row per (reader, abstract, entity) that has that
    label: gold, score (mean probability over the entity's words, the best occurrence), predicted.
    `probs`: per doc, (n_words, K) extra-target probabilities in the order of `columns`."""
    out: dict[str, list[dict[str, Any]]] = {c: [] for c in columns}
    for d, p in zip(docs, probs):
        for e in d.entities:
            for k, c in enumerate(columns):
                if c not in e.extra:
                    continue
                s = max(float(p[a:b, k].mean()) for a, b in e.spans)
                out[c].append({"reader": d.reader, "doc": d.doc_id, "entity": e.text, "gold": bool(e.extra[c]),
                               "score": s, "pred": s >= threshold})
    return out


def extra_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """One extra target's metrics: precision / recall / F1 of the positive class overall (micro) and
    macro over readers, F1 per reader, accuracy, and the F1 of answering yes for every entity."""
    out = decision_metrics(rows)
    readers = sorted({r["reader"] for r in rows if r["reader"] is not None})
    for k in ("precision", "recall"):
        per = [decision_metrics([r for r in rows if r["reader"] == who])[k] for who in readers]
        if per:
            out[f"macro_{k}"] = float(np.mean(per))
    out["f1_all_yes"] = prf(sum(r["gold"] for r in rows), sum(not r["gold"] for r in rows), 0)["f1"]
    out["n"] = float(len(rows))
    return out


def decision_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Jargon-class precision / recall / F1 over all (reader, abstract, entity) decisions (micro),
    F1 per reader (`f1_reader/<r>`), their unweighted mean over the readers (`macro_f1`), and
    accuracy. Rows: `entity_decisions` (gold: familiarity <= the data's threshold, the study's 1)."""
    def count(rs):
        tp = sum(r["pred"] and r["gold"] for r in rs)
        fp = sum(r["pred"] and not r["gold"] for r in rs)
        fn = sum(not r["pred"] and r["gold"] for r in rs)
        return prf(tp, fp, fn)

    out = dict(count(rows))
    readers = sorted({r["reader"] for r in rows if r["reader"] is not None})
    per = {who: count([r for r in rows if r["reader"] == who])["f1"] for who in readers}
    out.update({f"f1_reader/{who}": v for who, v in per.items()})
    if per:
        out["macro_f1"] = float(np.mean(list(per.values())))
    out["accuracy"] = float(np.mean([r["pred"] == r["gold"] for r in rows])) if rows else 0.0
    return out


def extract_terms(model, encoder, docs: list[Doc], key=term_key,
                  probs: list[np.ndarray] | None = None) -> tuple[set[str], list[list[int]]]:
    """TermEval: the set of unique terms the model tags in `docs` (each tagged word span joined by
    spaces, then `key`: `termeval_key` for the reference match, `term_key` for ours), and the tags.
    `probs`: the docs' word tag probabilities when already computed."""
    if probs is None:
        probs = word_probs(model, encoder, [(d.words, d.profile) for d in docs])
    tags = [decode(p) for p in probs]
    terms = set()
    for d, t in zip(docs, tags):
        terms |= doc_terms(d, t, key=key)
    return terms, tags


# ACTER 1.5's normalisation (its README, section 5.6), applied to its texts and term lists alike.
_ACTER_PAIRS = (",,", "''", "\u2018\u2019", "\u2019\u2019")  # two-character double quotes -> '"'
_ACTER_CHARS = {**{c: "-" for c in "\u2212\u2010"}, **{c: '"' for c in "\u201c\u201d\u201e"},
                **{c: "'" for c in "`\u00b4\u2019\u2018"}, "\u0130": "I",
                **{c: "" for c in "\uf8ee\uf8f9\uf8f0\uf8fb\u009c"}}
TERM_MATCH = ("reference", "original_list", "term_key")


def acter_normalise(text: str) -> str:
    """NFC, ACTER's dashes and quotes unified (hyphen, minus sign, U+2010 -> "-"; curly / low double
    quotes and ",,", "''" -> '"'; curly single quotes, backtick, acute -> "'"), "İ" -> "I", and the
    five private-use / control characters ACTER removes."""
    text = unicodedata.normalize("NFC", text)
    for pair in _ACTER_PAIRS:
        text = text.replace(pair, '"')
    return "".join(_ACTER_CHARS.get(c, c) for c in text)


def termeval_key(term: str) -> str:
    """TermEval's comparison of terms: ACTER-normalised, lowercased (`str.lower`, as ACTER's lists),
    runs of whitespace as one space; otherwise the exact string (so "heart-failure" and
    "heart - failure" differ, unlike `term_key`)."""
    return " ".join(acter_normalise(term).lower().split())


def term_keyer(definition: str = "reference"):
    """The function that turns a term into what is compared: `termeval_key` ("reference",
    "original_list") or `term_key` ("term_key": punctuation split off, so the spacing around it
    does not matter; this suite's former match)."""
    if definition not in TERM_MATCH:
        raise ValueError(f"term match must be one of {TERM_MATCH}, got {definition!r}")
    return term_key if definition == "term_key" else termeval_key


def term_metrics(predicted: set[str], gold: set[str]) -> dict[str, float]:
    """TermEval 2020: precision / recall / F1 of the set of unique predicted terms against the set
    of unique gold terms (both already keyed the same way, `term_keyer`)."""
    tp = len(predicted & gold)
    return {**prf(tp, len(predicted - gold), len(gold - predicted)),
            "n_predicted": float(len(predicted)), "n_gold": float(len(gold))}


def tag_spans(words: list[str], probs: np.ndarray) -> list[dict[str, Any]]:
    """Decoded spans of one text with their scores, in text order."""
    return [{"term": " ".join(words[s:t]), "start": s, "end": t, "score": span_score(probs, (s, t))}
            for s, t in spans_of(decode(probs))]


def decode_terms(words: list, probs: np.ndarray) -> list[dict[str, Any]]:
    """The terms text.predict reports for one text: the tagger's BIO spans (argmax), in text order, as
    {term (its surface text), start, end (word indices), score}, with three rules on top:

    - a hyphenated compound is one word: the model sees "state", "-", "level" (the word split it was
      trained with), and a span that covers any piece of a compound grows to the whole compound;
      spans joined through one merge ("difference-in-differences", not "difference", "in",
      "differences"; "state-level panel", not "state", "level panel");
    - punctuation at either end of a span is left out, and a span made only of function words and
      punctuation (`text.words.is_stop`) is never a term;
    - the score is the mean P(B or I) over the span's letter / digit words (the compound's pieces,
      not its hyphens, which a tagger marks O).

    `words`: `text.words.Word`s (text and character offsets), one per row of `probs`."""
    from text.words import compounds, is_stop, surface

    whole = {}
    for a, b in compounds(words):
        for k in range(a, b):
            whole[k] = (a, b)
    spans = []
    for s, t in spans_of(decode(probs)):
        s, t = whole.get(s, (s, t))[0], whole.get(t - 1, (s, t))[1]
        if spans and s < spans[-1][1]:  # overlaps the previous one (through a compound): one span
            spans[-1] = (spans[-1][0], max(t, spans[-1][1]))
        else:
            spans.append((s, t))
    rows = []
    for s, t in spans:
        while s < t and s not in whole and not any(c.isalnum() for c in words[s].text):
            s += 1
        while t > s and t - 1 not in whole and not any(c.isalnum() for c in words[t - 1].text):
            t -= 1
        if s == t or all(is_stop(w.text) for w in words[s:t]):
            continue
        content = [k for k in range(s, t) if any(c.isalnum() for c in words[k].text)]
        score = float((probs[content, B] + probs[content, I]).mean())
        rows.append({"term": surface(words[s:t]), "start": s, "end": t, "score": score})
    return rows


__all__ = ["HashTokenizer", "HFTokenizer", "build_tokenizer", "WindowEncoder", "Window", "collate", "TokenHead",
           "word_probs", "word_outputs", "window_outputs", "window_probs", "merge_windows", "entity_decisions", "extra_decisions", "extra_metrics", "decision_metrics",
           "extract_terms", "term_metrics", "tag_spans", "decode_terms", "acter_normalise", "termeval_key", "term_keyer", "TERM_MATCH",
           "entity_score", "span_score", "term_key", "O", "B", "I"]
