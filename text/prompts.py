"""The generative path's questions: the prompt asked about one term for one reader, the prompting
baselines' in-context examples (`BASELINES`), and candidate terms of a text when no tagger names them.

- `Query`: one (reader, abstract, entity) question, with the gold answer when known;
- `prompt_parts(q)`: the prompt split before the entity, so the terms of one abstract share a prefix;
- `with_baseline(queries, kind, train)`: vanilla, reader metadata, reader profile (the reader's own
  labelled examples), nearest annotator (examples of the reader whose labels agree most), nearest
  abstract (the reader's labelled abstract closest by BM25, `rank_bm25`);
- `candidate_terms(text)`: runs of content words, hyphenated compounds kept whole.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass

from text.data import Doc

QUESTION_HEAD = 'Question: is the term "'
QUESTION_TAIL = ('" jargon for this reader, that is, would they need it explained to understand the abstract? '
                 'Answer yes or no.\nAnswer:')
QUESTION = QUESTION_HEAD + "{entity}" + QUESTION_TAIL
BASELINES = ("vanilla", "metadata", "profile", "nearest_annotator", "nearest_abstract")


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


def prompt_parts(q: Query, with_reader: bool = True) -> tuple[str, str]:
    """(head, tail): everything up to the entity's opening quote (shared by every entity asked about
    one abstract for one reader and context), and the entity with the rest of the question."""
    reader = f"Reader: {q.profile}\n" if with_reader and q.profile else ""
    return f"Abstract: {q.abstract}\n{reader}{q.context}{QUESTION_HEAD}", q.entity + QUESTION_TAIL


def prompt(q: Query, with_reader: bool = True) -> str:
    return "".join(prompt_parts(q, with_reader))


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
    for q in queries:
        q = copy.copy(q)
        mine = by_reader.get(q.reader, [])
        if kind == "profile":  # the same k examples for every query of a reader: the reader's profile
            rng = random.Random(f"{seed}:{q.reader}")
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


STOP_WORDS = frozenset("""a about above after again against all also although among an and any are as at be because
been before being below between both but by can could did do does doing done during each either et al few for
from further had has have having here how however i if in into is it its itself may might more most much must
no nor not of off on once only or other our ours out over own per same several she should since so some such
than that the their theirs them then there these they this those through thus to too under until up upon us
use used using very via was we were what when where whether which while who whom why will with within without
would yet you your new two one three first second paper study studies show shows shown propose proposed
present results result based approach method methods""".split())


def candidate_terms(text: str, max_words: int = 3) -> list[str]:
    """Candidate terms of a text without a tagger: runs of up to `max_words` content words (letters,
    at least 3 characters, not stop words; a hyphenated compound such as "no-arbitrage" counts as one
    content word) separated by single spaces, in text order, each once (case-insensitive)."""
    from text.words import split_words

    tokens = []  # (start, end, is content, ends with a hyphen), hyphenated compounds joined
    for w in split_words(text):
        if tokens and (w.text == "-" or tokens[-1][3]) and w.start == tokens[-1][1]:
            s0, _, c, _ = tokens[-1]
            tokens[-1] = (s0, w.end, c or (w.text.isalpha() and len(w.text) >= 2), w.text == "-")
            continue
        content = w.text.isalpha() and len(w.text) >= 3 and w.text.lower() not in STOP_WORDS
        tokens.append((w.start, w.end, content, False))
    out, seen, run = [], set(), []

    def flush():
        if run:
            term = text[run[0][0]:run[-1][1]]
            if term.lower() not in seen:
                seen.add(term.lower())
                out.append(term)
            run.clear()

    for tok in tokens:
        start, end, content, dangling = tok
        if not content or dangling:
            flush()
            continue
        if run and (start - run[-1][1] != 1 or text[run[-1][1]] != " " or len(run) == max_words):
            flush()
        run.append(tok)
    flush()
    return out
