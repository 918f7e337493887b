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
The resamples are drawn by the core's `shared.bootstrap` (seeded, 1,000 by default). Because a
resample holds only ~63% distinct sentences, set-level scores shift under resampling (on ACTER htfl
with the LoRA tagger: precision up ~2 points, recall down ~1.5, as each term occurs fewer times);
the interval reported is therefore the resamples' percentile spread placed around the full-set value
(`term_bootstrap`), with the shift kept beside it. `term_difference` gives the paired interval of the
difference between two taggers scored on the same resamples.
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


def _recentred(point: float, values: np.ndarray, level: float) -> tuple[float, float, float]:
    """(low, high, shift): the `level` percentile interval of the resample values moved by the shift
    (their median minus the full-set value `point`), so that it sits around `point`."""
    a = 100 * (1 - level) / 2
    lo, mid, hi = np.percentile(values, [a, 50, 100 - a])
    return float(point - (mid - lo)), float(point + (hi - mid)), float(mid - point)


def _resample_values(fn, n: int, resamples: int, seed: int, level: float) -> np.ndarray:
    """fn(items) on `resamples` seeded resamples of range(n) (with replacement), drawn by the core's
    `shared.bootstrap.bootstrap_interval` (the same draws for the same seed); fn returns a tuple of
    values per resample: (resamples, len(tuple))."""
    from shared.bootstrap import bootstrap_interval

    values: list[tuple[float, ...]] = []

    def record(idx, _):
        v = fn(idx)
        values.append(v)
        return v[0]

    items = np.arange(n)
    bootstrap_interval(record, items, [items], n_resamples=resamples, seed=seed, alpha=1 - level)
    return np.asarray(values, dtype=np.float64)


def term_bootstrap(pred: Sequence[set[str]], gold_by_sentence: Sequence[set[str]], gold: set[str],
                   resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Point estimates (all sentences once) and `level` intervals from `resamples` seeded resamples of
    the sentences: {precision, recall, f1, <m>_lo, <m>_hi, <m>_shift, bootstrap_resamples}.

    A resample holds about 63% distinct sentences and a set-level score moves with the corpus's size
    (fewer occurrences of each term: recall falls, precision rises on ACTER), so the raw percentile
    interval can miss the full-set value altogether. The interval reported is the resamples' spread
    around the full-set value: their percentile interval moved by `<m>_shift` (resample median minus
    full-set value, kept beside it). Its width comes from corpora of ~63% distinct sentences, which
    vary more than the full set: it errs on the wide side."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    scorer = SetScorer(pred, gold_by_sentence, gold)
    n = scorer.n
    point = scorer.score(np.ones(n))
    out: dict[str, float] = {m: float(point[m][0]) for m in METRICS}
    if n < 2:  # nothing to resample
        return {**out, **{f"{m}_{s}": out[m] for m in METRICS for s in ("lo", "hi")},
                **{f"{m}_shift": 0.0 for m in METRICS}, "bootstrap_resamples": 0.0}

    def scores(idx):
        got = scorer.score(np.bincount(idx, minlength=n)[None])
        return tuple(float(got[m][0]) for m in METRICS)

    values = _resample_values(scores, n, resamples, seed, level)
    for k, m in enumerate(METRICS):
        lo, hi, shift = _recentred(out[m], values[:, k], level)
        out[f"{m}_lo"], out[f"{m}_hi"], out[f"{m}_shift"] = max(0.0, lo), min(1.0, hi), shift
    out["bootstrap_resamples"] = float(resamples)
    return out


def term_difference(pred_a: Sequence[set[str]], pred_b: Sequence[set[str]], gold_by_sentence: Sequence[set[str]],
                    gold: set[str], metric: str = "f1", resamples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[str, float]:
    """Two taggers on the same test sentences: metric(A) - metric(B) on the full set and its paired
    interval (both scored on the SAME resamples, moved like `term_bootstrap`'s): {diff, lo, hi, shift}.
    An interval that excludes 0 says the difference holds across test sets drawn like this one."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    a, b = SetScorer(pred_a, gold_by_sentence, gold), SetScorer(pred_b, gold_by_sentence, gold)
    if a.n != b.n:
        raise ValueError(f"the two taggers scored {a.n} and {b.n} sentences")
    diff = a.metric(np.arange(a.n), metric) - b.metric(np.arange(a.n), metric)
    values = _resample_values(lambda idx: (a.metric(idx, metric) - b.metric(idx, metric),), a.n, resamples, seed,
                              level)
    lo, hi, shift = _recentred(diff, values[:, 0], level)
    return {"diff": float(diff), "lo": lo, "hi": hi, "shift": shift}
