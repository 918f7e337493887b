"""Bootstrap intervals of TermEval's set metrics over test sentences (`text.bootstrap`)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.text.fixtures import write_acter
from text import bootstrap as BS
from text.data import Doc
from text.datamodules import ActerDataModule
from text.tagger import term_metrics, termeval_key

# three sentences; "z" is on the gold list but occurs in none of them (missed in every resample)
PRED = [{"a", "x"}, {"b"}, set()]
GOLD_BY = [{"a"}, {"b", "c"}, {"c"}]
GOLD = {"a", "b", "c", "z"}


def naive(counts):
    """TermEval's set metrics of the corpus that holds sentence i counts[i] times, by plain set unions."""
    drawn = [i for i, c in enumerate(counts) for _ in range(int(c))]
    pred = set().union(set(), *(PRED[i] for i in drawn))
    gold = set().union({"z"}, *(GOLD_BY[i] for i in drawn))
    return term_metrics(pred, gold)


def test_set_scorer_on_a_hand_example():
    s = BS.SetScorer(PRED, GOLD_BY, GOLD)
    full = {k: float(v[0]) for k, v in s.score(np.ones(3)).items()}
    # pred {a, x, b}, gold {a, b, c, z}: tp 2 -> P 2/3, R 1/2, F1 4/7
    assert full == pytest.approx({"precision": 2 / 3, "recall": 0.5, "f1": 4 / 7})
    assert full == pytest.approx({k: term_metrics({"a", "x", "b"}, GOLD)[k] for k in BS.METRICS})
    got = s.score(np.array([[2, 0, 1], [0, 0, 3], [0, 1, 0]]))
    # [2, 0, 1]: pred {a, x}, gold {a, c, z}: P 1/2, R 1/3, F1 0.4; [0, 0, 3]: nothing predicted: 0, 0, 0;
    # [0, 1, 0]: pred {b}, gold {b, c, z}: P 1, R 1/3, F1 0.5
    assert got["precision"] == pytest.approx([0.5, 0.0, 1.0])
    assert got["recall"] == pytest.approx([1 / 3, 0.0, 1 / 3])
    assert got["f1"] == pytest.approx([0.4, 0.0, 0.5])
    for counts in itertools.product(range(3), repeat=3):  # every multiset of up to 2 copies each
        want = naive(counts)
        assert {k: float(v[0]) for k, v in s.score(np.array(counts)).items()} == pytest.approx(
            {k: want[k] for k in BS.METRICS}), counts


def test_term_bootstrap_is_seeded_and_brackets_the_spread():
    a = BS.term_bootstrap(PRED, GOLD_BY, GOLD, resamples=1000, seed=0)
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((2 / 3, 0.5, 4 / 7))  # the full-set score
    assert a == BS.term_bootstrap(PRED, GOLD_BY, GOLD, resamples=1000, seed=0)  # same seed, same interval
    rng = np.random.default_rng(7)  # 60 sentences of random terms: another seed, other resamples
    gold_by = [{f"t{k}" for k in rng.integers(0, 40, 3)} for _ in range(60)]
    pred = [{t for t in g if rng.random() < 0.6} | {f"n{rng.integers(0, 30)}"} for g in gold_by]
    gold = set().union(*gold_by)
    assert BS.term_bootstrap(pred, gold_by, gold, seed=0) != BS.term_bootstrap(pred, gold_by, gold, seed=1)
    assert a["bootstrap_resamples"] == 1000
    # the same draws as the core's bootstrap (seeded numpy generator, n indices per resample), scored
    # naively: the interval is their 2.5 / 97.5 percentiles moved by (median - full-set value)
    rng = np.random.default_rng(0)
    naive_values = [naive(np.bincount(rng.integers(0, 3, size=3), minlength=3)) for _ in range(1000)]
    for m in BS.METRICS:
        lo, mid, hi = np.percentile([v[m] for v in naive_values], [2.5, 50, 97.5])
        assert a[f"{m}_shift"] == pytest.approx(mid - a[m])
        assert (a[f"{m}_lo"], a[f"{m}_hi"]) == pytest.approx((max(0.0, a[m] - (mid - lo)), min(1.0, a[m] + (hi - mid))))
        assert 0.0 <= a[f"{m}_lo"] <= a[m] <= a[f"{m}_hi"] <= 1.0
    # every sentence alike: every resample is the same corpus, so the interval has no width
    same = BS.term_bootstrap([{"a"}] * 5, [{"a", "b"}] * 5, {"a", "b"}, resamples=200)
    assert same["f1_lo"] == same["f1_hi"] == same["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="outside the gold list"):
        BS.SetScorer(PRED, [{"q"}, set(), set()], GOLD)


def test_sentence_gold_finds_nested_terms_and_keeps_unseen_ones_apart():
    docs = [Doc(["Chronic", "heart", "failure", "patients"], "s1"), Doc(["The", "NYHA", "class", "."], "s2")]
    gold = {"chronic heart failure", "heart failure", "heart", "nyha class", "ejection fraction"}
    by = BS.sentence_gold(docs, gold, termeval_key)
    assert by == [{"chronic heart failure", "heart failure", "heart"}, {"nyha class"}]
    tags = [[1, 2, 2, 0], [0, 0, 0, 0]]  # "Chronic heart failure" tagged as one term; nothing in s2
    pred = BS.sentence_predictions(docs, tags, termeval_key)
    assert pred == [{"chronic heart failure"}, set()]
    out = BS.term_bootstrap(pred, by, gold, resamples=100)
    assert (out["precision"], out["recall"]) == pytest.approx((1.0, 1 / 5))  # "ejection fraction" is always missed


def test_acter_data_checks_the_resample_count(tmp_path):
    root = write_acter(tmp_path / "acter")
    assert ActerDataModule(root=str(root), tokenizer={"kind": "hash"}).bootstrap == 1000
    with pytest.raises(ValueError, match="data.bootstrap must be >= 0"):
        ActerDataModule(root=str(root), bootstrap=-1)


def test_method_table_rows_intervals_ratios_and_the_lr_grid(tmp_path):
    import json

    from text import report

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"config": {"batch": 8, "seq": 128, "threads": 1}, "train_step": [
        {"key": "full", "method": None, "step_ratio": 1.0, "peak_rss_ratio": 1.0, "peak_above_baseline_ratio": 1.0},
        {"key": "linear_probe", "method": None, "step_ratio": 0.34, "peak_rss_ratio": 0.53,
         "peak_above_baseline_ratio": 0.19},
        {"key": "bitfit", "method": {"name": "bitfit"}, "step_ratio": 0.84, "peak_rss_ratio": 0.74,
         "peak_above_baseline_ratio": 0.45}]}))

    def row(run, methods, lr, val, f1=0.4):
        return {"run": run, "dataset": "acter-htfl", "config": {"model": {"methods": methods, "lr": lr}},
                "test/f1": f1, "test/f1_lo": f1 - 0.02, "test/f1_hi": f1 + 0.03, "test/precision": 0.5,
                "test/precision_lo": 0.45, "test/precision_hi": 0.55, "test/recall": 1 / 3, "test/recall_lo": 0.3,
                "test/recall_hi": 0.36, "test/n_predicted": 1500.0, "test/n_gold": 2339.0,
                "test/bootstrap_resamples": 1000.0, "trainable_params": 1155, "val/f1_best": val,
                "cpu_seconds": 150.0, "torch_threads": 1}

    rows = [row("p3", [], 1e-3, 0.20), row("p2", [], 1e-2, 0.30), row("bf", [{"name": "bitfit", "include_norms": True}], 5e-3, 0.4),
            row("lo", [{"name": "lora", "r": 8, "targets": ["query", "value"]}], 1e-3, 0.4),
            {"run": "other", "dataset": "jargon-x", "test/f1": 0.5}]  # not an ACTER run with intervals: left out
    # two runs saved their per-sentence terms: the worse one gets its paired difference to the best
    for r, pred in ((rows[2], PRED), (rows[3], [{"a"}, set(), set()])):
        folder = tmp_path / r["run"]
        folder.mkdir()
        (folder / "test_terms.json").write_text(json.dumps({
            "doc_ids": ["s0", "s1", "s2"], "pred": [sorted(x) for x in pred],
            "gold_by_sentence": [sorted(x) for x in GOLD_BY], "gold": sorted(GOLD), "term_match": "reference"}))
        r["_path"] = str(folder / "metrics.json")
    rows[2].update({"test/precision": 2 / 3, "test/recall": 0.5, "test/f1": 4 / 7})  # what its terms give
    rows[3].update({"test/precision": 1.0, "test/recall": 0.25, "test/f1": 0.4})
    want = BS.term_difference([{"a"}, set(), set()], PRED, GOLD_BY, GOLD)
    assert want["diff"] == pytest.approx(2 / 5 - 4 / 7)  # {a} alone: P 1, R 1/4 -> F1 0.4
    assert want["lo"] <= want["diff"] <= want["hi"]
    table = report.method_table(rows, bench)
    lines = [line for line in table.splitlines() if line.startswith("| htfl")]
    assert [line.split(" | ")[-1].rstrip(" |") for line in lines] == ["lo", "bf", "p3", "p2"]  # regime order, then lr
    lo, bf, p3, p2 = lines
    assert "| 40.0 [38.0, 43.0] | 50.0 [45.0, 55.0] | 33.3 [30.0, 36.0] | - | 1,500 / 2,339 | 1,155 |" in p2
    ci = BS.term_bootstrap(PRED, GOLD_BY, GOLD)  # a run with saved terms: intervals recomputed from them
    assert f"| 57.1 [{100 * ci['f1_lo']:.1f}, {100 * ci['f1_hi']:.1f}] | 66.7 [" in bf and "| best |" in bf
    assert f"| {100 * want['diff']:+.1f} [{100 * want['lo']:+.1f}, {100 * want['hi']:+.1f}] |" in lo
    rows[2]["test/f1"] = 0.5
    with pytest.raises(ValueError, match="test_terms.json gives f1 0.571429, metrics.json 0.500000"):
        report.method_table(rows, bench)
    assert "| 0.84x | 0.74x | 0.45x |" in bf and "| 2.5 (1) |" in bf  # BitFit's defaults match the bench row
    assert "(not chosen)" in p3 and "(chosen on val)" in p2 and "| 0.34x | 0.53x | 0.19x |" in p2
    assert "| - | - | - | 40.0 |" in lo and "no row for: LoRA r8 on query,value" in table
    assert report.method_table(rows[-1:], bench) == ""
