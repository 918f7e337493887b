"""Bootstrap intervals of TermEval's set metrics, resampling the test SENTENCES.

TermEval 2020 scores the set of unique predicted terms against the domain's set of unique gold terms
(`text.tagger.term_metrics`), so a sentence is not an independent unit of the score and a per-item
bootstrap does not apply as is. Here a resample of the test sentences (with replacement, as many as
there are) is scored as a corpus of its own:

- its predicted set: the union of the terms tagged in its sentences;
- its gold set: the gold-list terms that occur (as a word sequence, keyed as the metric keys them) in
  its sentences, plus the gold-list terms that occur in no test sentence at all (so that they are
  missed in every resample, as they are in the full score).

On the full test set (every sentence once) this gives exactly the reported precision / recall / F1.
The interval is the percentile interval of the resamples' values (`shared.bootstrap`, the core's
bootstrap; seeded, 1,000 resamples by default); `term_difference` gives the paired interval of the
difference between two taggers scored on the same resamples. A resample holds about 63% of the distinct sentences, so its sets are smaller than the
corpus's; the interval describes how the score moves with the sample of sentences, not a correction
of the point estimate (which stays the full-set score).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from text.data import Doc, doc_terms

METRICS = ("precision", "recall", "f1")


def sentence_predictions(docs: Sequence[Doc], tags: Sequence[Sequence[int]], key: Callable[[str], str]) -> list[set[str]]:
    """The keyed terms the tagger predicts in each sentence (as `text.tagger.extract_terms` unites them)."""
    return [doc_terms(d, t, key=key) for d, t in zip(docs, tags)]


def sentence_gold(docs: Sequence[Doc], gold: set[str], key: Callable[[str], str]) -> list[set[str]]:
    """Per sentence, the gold terms that occur in it: every word n-gram (n up to the longest gold term,
    in keyed words) whose key is in `gold`. Nested terms count where they occur, tagged or not."""
    if not gold:
        return [set() for _ in docs]
    longest = max(len(g.split(" ")) for g in gold)
    first = {g.split(" ")[0] for g in gold}
    out = []
    for d in docs:
        words, found = d.words, set()
        for i, w in enumerate(words):
            head = key(w).split(" ")[0]
            if not head or head not in first:
                continue  # the key of an n-gram starts with the key of its first word
            for n in range(1, min(longest, len(words) - i) + 1):
                k = key(" ".join(words[i:i + n]))
                if k in gold:
                    found.add(k)
        out.append(found)
    return out


def _prf(tp: np.ndarray, n_pred: np.ndarray, n_gold: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised `text.tagger.prf` (a 0 / 0 ratio is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n_pred > 0, tp / np.maximum(n_pred, 1), 0.0)
        r = np.where(n_gold > 0, tp / np.maximum(n_gold, 1), 0.0)
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1.0), 0.0)
    return {"precision": p, "recall": r, "f1": f}


class SetScorer:
    """Scores any multiset of the sentences (a vector of counts) with TermEval's set metrics."""

    def __init__(self, pred: Sequence[set[str]], gold_by_sentence: Sequence[set[str]], gold: set[str]):
        from scipy import sparse

        if len(pred) != len(gold_by_sentence):
            raise ValueError(f"{len(pred)} sentences of predictions but {len(gold_by_sentence)} of gold terms")
        # a predicted gold term occurs where it was predicted (guards n-grams the search did not reach)
        gold_by_sentence = [set(g) | (set(p) & gold) for p, g in zip(pred, gold_by_sentence)]
        extra = set().union(*gold_by_sentence) - gold if gold_by_sentence else set()
        if extra:
            raise ValueError(f"sentence gold terms outside the gold list: {sorted(extra)[:3]}")
        vocab = sorted(set().union(set(), *pred) | gold)
        index = {t: i for i, t in enumerate(vocab)}
        self.n, self.size = len(pred), len(vocab)

        def incidence(sets):
            rows = [i for i, s in enumerate(sets) for _ in s]
            cols = [index[t] for s in sets for t in s]
            return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(self.n, self.size))

        self.pred, self.gold = incidence(pred), incidence(gold_by_sentence)
        self.is_gold = np.zeros(self.size, dtype=bool)
        self.is_gold[[index[t] for t in gold]] = True
        self.always = self.is_gold.copy()  # gold terms that occur in no sentence
        self.always[[index[t] for s in gold_by_sentence for t in s]] = False

    def score(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """counts: (R, n) how often each sentence is drawn in each of R resamples -> metric -> (R,)."""
        counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
        pred = np.asarray(self.pred.T @ counts.T).T > 0  # (R, V): the term is predicted in a drawn sentence
        gold = (np.asarray(self.gold.T @ counts.T).T > 0) | self.always
        tp = (pred & gold & self.is_gold).sum(1)
        return _prf(tp.astype(float), pred.sum(1).astype(float), gold.sum(1).astype(float))

    def metric(self, items: np.ndarray, name: str) -> float:
        """One metric of the corpus made of the sentences `items` (indices, repeats allowed)."""
        return float(self.score(np.bincount(items, minlength=self.n)[None])[name][0])


def term_bootstrap(pred: Sequence[set[str]], gold_by_sentence: Sequence[set[str]], gold: set[str],
                   resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Point estimates (all sentences once) and `level` percentile intervals over `resamples` seeded
    resamples of the sentences (`shared.bootstrap.bootstrap_interval`; each metric on the same
    resamples): {precision, recall, f1, <m>_lo, <m>_hi, bootstrap_resamples}."""
    from shared.bootstrap import bootstrap_interval

    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    scorer = SetScorer(pred, gold_by_sentence, gold)
    n = scorer.n
    point = scorer.score(np.ones(n))
    out: dict[str, float] = {m: float(point[m][0]) for m in METRICS}
    if n < 2:  # nothing to resample
        return {**out, **{f"{m}_{s}": out[m] for m in METRICS for s in ("lo", "hi")}, "bootstrap_resamples": 0.0}
    items = np.arange(n)
    for m in METRICS:
        out[f"{m}_lo"], out[f"{m}_hi"] = bootstrap_interval(lambda idx, _, m=m: scorer.metric(idx, m), items, [items],
                                                            n_resamples=resamples, seed=seed, alpha=1 - level)
    out["bootstrap_resamples"] = float(resamples)
    return out


def term_difference(pred_a: Sequence[set[str]], pred_b: Sequence[set[str]], gold_by_sentence: Sequence[set[str]],
                    gold: set[str], metric: str = "f1", resamples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[str, float]:
    """Two taggers on the same test sentences: metric(A) - metric(B) on the full set and its paired
    percentile interval (both scored on the SAME resamples): {diff, lo, hi}. An interval that
    excludes 0 says the difference holds across test sets drawn like this one."""
    from shared.bootstrap import bootstrap_interval

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    a, b = SetScorer(pred_a, gold_by_sentence, gold), SetScorer(pred_b, gold_by_sentence, gold)
    if a.n != b.n:
        raise ValueError(f"the two taggers scored {a.n} and {b.n} sentences")
    items = np.arange(a.n)
    diff = a.metric(items, metric) - b.metric(items, metric)
    lo, hi = bootstrap_interval(lambda idx, _: a.metric(idx, metric) - b.metric(idx, metric), items, [items],
                                n_resamples=resamples, seed=seed, alpha=1 - level)
    return {"diff": float(diff), "lo": lo, "hi": hi}
