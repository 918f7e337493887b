"""`python -m text.personalise` (the generative path's CLI) and `text.predict` on its bundles, on a tiny
random Llama with byte tokens: metrics.json and bundles written, reader bundles that reproduce their
scores exactly, predict with --reader, clear errors for an unknown reader and for bad data."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.cli import friendly
from text import generative as G
from text import prompts
from text import personalise as P
from text.data import DataError
from text.predict import main as predict_main
from text.tagger import decision_metrics

ARGS = ["--demo-abstracts", "5", "--readers", "r1,r2", "--test-abstracts", "2", "--shared-steps", "3",
        "--reader-steps", "2", "--r", "4", "--alpha", "8", "--batch-size", "6", "--baselines", "vanilla,metadata"]
# tiny-llama-lm: width 32, 2 layers, 4 heads of 8, 2 KV heads: q_proj 32->32, v_proj 32->16; LoRA r=4:
# q: 4*32 + 32*4 = 256, v: 4*32 + 16*4 = 192 per layer.
LORA_PARAMS = 2 * (256 + 192)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("personalise") / "run"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        metrics = P.main(ARGS + ["--output-dir", str(out)])
    args = P.parser().parse_args(ARGS + ["--output-dir", str(out)])
    train, test, _ = P.split_queries(args)
    return out, metrics, buf.getvalue(), train, test


def test_cli_demo_writes_metrics_scores_and_reader_bundles(run):
    out, metrics, printed, train, test = run
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # atomic writes leave no temp files
    assert metrics["data"]["simulated"] is True and metrics["data"]["kind"] == "synthetic"
    assert metrics["definition"] == "reference"  # the study's jargon = familiarity <= 1 (docs/metrics.md)
    assert metrics["data"]["n_test"] == len(test) == 2 * 2 * 9 and metrics["data"]["n_train"] == len(train) == 3 * 2 * 9
    assert "SIMULATED" in printed and "per-reader LoRA" in printed and "(readers are SIMULATED)" in printed
    assert set(metrics["results"]) == {"all_yes", "vanilla", "metadata", "shared_lora", "reader_lora"}
    ref = metrics["results"].pop("all_yes")  # answering jargon for every term: recall 1, precision = the jargon rate
    rate = np.mean([q.gold for q in test])
    assert ref["recall"] == 1 and ref["precision"] == pytest.approx(rate) and ref["f1"] == pytest.approx(2 * rate / (1 + rate))
    assert ref["macro_auc"] == 0.5 and ref["wall_s"] is None
    assert metrics["lora"]["trainable_per_adapter"] == LORA_PARAMS
    assert metrics["results"]["vanilla"]["trainable"] == 0
    assert metrics["results"]["shared_lora"]["trainable"] == LORA_PARAMS
    assert metrics["results"]["reader_lora"]["trainable"] == 2 * LORA_PARAMS
    assert len(metrics["training"]["shared_losses"]) == 3
    assert {r: len(v) for r, v in metrics["training"]["reader_losses"].items()} == {"r1": 2, "r2": 2}
    # every reported F1 is what the saved per-query margins give
    saved = json.loads((out / "scores.json").read_text())
    assert [(q["reader"], q["doc"], q["entity"], q["gold"]) for q in saved["queries"]] == \
        [(q.reader, q.doc_id, q.entity, bool(q.gold)) for q in test]
    for method, m in metrics["results"].items():
        again = decision_metrics(G.decisions(saved["scores"][method], test))
        assert m["f1"] == pytest.approx(again["f1"]) and m["precision"] == pytest.approx(again["precision"])
        assert m["f1_reader"] == pytest.approx({"r1": again["f1_reader/r1"], "r2": again["f1_reader/r2"]})
        assert m["macro_f1"] == pytest.approx(np.mean(list(m["f1_reader"].values())))
        assert 0 <= m["f1"] <= 1 and m["wall_s"] > 0
        golds = [bool(q.gold) for q in test]
        pairs = [(p, n) for p, g in zip(saved["scores"][method], golds) if g
                 for n, h in zip(saved["scores"][method], golds) if not h]
        assert m["auc"] == pytest.approx(np.mean([(p > n) + 0.5 * (p == n) for p, n in pairs]))
        assert m["macro_auc"] == pytest.approx(np.mean([v for v in m["auc_reader"].values()]))
    # vanilla ignores the reader: the same margins for both readers on the same (abstract, term)
    van = {(q.reader, q.doc_id, q.entity): s for q, s in zip(test, saved["scores"]["vanilla"])}
    assert all(van[("r1", d, e)] == van[("r2", d, e)] for _, d, e in van)
    # the shared adapter and one bundle per reader, tagged for text.predict
    metas = {p.parent.name: json.loads(p.read_text()) for p in (out / "adapters").glob("*/*/adapter.json")}
    shared = json.loads((out / "adapters" / "shared" / "adapter.json").read_text())
    assert sorted(metas) == ["r1", "r2"] and shared["reader"] == G.SHARED
    assert {m["reader"] for m in metas.values()} == {"r1", "r2"}
    for m in [shared, *metas.values()]:
        assert m["task"] == G.TASK and m["domain"] == "text" and m["backbone"]["id"] == "tiny-llama-lm"
        assert m["preprocessing"]["tokenizer"] == {"kind": "byte"} and m["backbone"]["kwargs"] == {"seed": 0}
        assert m["metrics"]["definition"] == "reference"
    assert metas["r1"]["preprocessing"]["readers"] == {"r1": "reader r1; background biology; 12 papers; publishing since 2015"}
    assert sorted(shared["preprocessing"]["readers"]) == ["r1", "r2"]


def test_a_reader_bundle_reproduces_its_scores_exactly(run):
    out, metrics, _, _, test = run
    saved = json.loads((out / "scores.json").read_text())["scores"]
    for reader in ("r1", "r2"):
        scorer, meta = G.load_bundle(out / "adapters" / "readers" / reader)
        assert meta["reader"] == reader
        idx = [i for i, q in enumerate(test) if q.reader == reader]
        got = scorer.score_shared([(test[i], True) for i in idx])
        assert got == [saved["reader_lora"][i] for i in idx]  # bit for bit
    scorer, _ = G.load_bundle(out / "adapters" / "shared")
    assert scorer.score_shared([(q, True) for q in test]) == saved["shared_lora"]
    # the readers' adapters differ from each other and from the shared one
    assert saved["reader_lora"] != saved["shared_lora"]


def test_predict_with_a_generative_bundle_and_reader(run, capsys):
    out, _, _, _, test = run
    q = next(q for q in test if q.reader == "r2")
    terms = [e.entity for e in test if e.reader == "r2" and e.doc_id == q.doc_id][:3]
    scorer, _ = G.load_bundle(out / "adapters" / "readers" / "r2")
    want = scorer.score_shared([(prompts.Query("r2", q.profile, q.abstract, t), True) for t in terms])
    args = ["--reader", "r2", "--all"] + [a for t in terms for a in ("--term", t)] + [q.abstract]
    for adapter in (out, out / "adapters" / "readers" / "r2"):  # the run folder, or the reader's bundle
        assert predict_main(["--adapter", str(adapter)] + args) == 0
        lines = capsys.readouterr().out.splitlines()
        n_jargon = sum(m > 0 for m in want)
        assert lines[0] == f"{n_jargon} of 3 terms marked as jargon for reader r2 (yes-no log-probability margin > 0):"
        assert lines[1:] == [f"{m:+.3f}\t{'jargon' if m > 0 else '-'}\t{t}" for m, t in zip(want, terms)]
    # without --term: the content-word candidates of the text
    assert predict_main(["--adapter", str(out), "--reader", "r2", "--all", q.abstract]) == 0
    lines = capsys.readouterr().out.splitlines()
    cands = prompts.candidate_terms(q.abstract)
    assert lines[0].split(" terms")[0].endswith(f"of {len(cands)}") and [ln.split("\t")[2] for ln in lines[1:]] == cands
    assert len(cands) >= 5 and all(c in q.abstract for c in cands)
    # a new reader described by --profile is answered by the shared adapter
    assert predict_main(["--adapter", str(out), "--profile", "reader new; background law", "--term", terms[0],
                         q.abstract]) == 0
    assert "for 'reader new; background law'" in capsys.readouterr().out


def test_predict_unknown_reader_is_one_clear_error(run, capsys):
    out, _, _, _, test = run
    text = test[0].abstract
    with pytest.raises(ValueError, match=r"unknown reader 'r9'; this adapter knows r1, r2 \(or describe a new reader "
                                         r"with --profile\)"):
        predict_main(["--adapter", str(out), "--reader", "r9", text])
    assert friendly(predict_main, ["--adapter", str(out / "adapters" / "readers" / "r1"), "--reader", "r2", text]) == 2
    assert capsys.readouterr().err == "error: unknown reader 'r2'; this adapter knows r1\n"
    with pytest.raises(ValueError, match="pass --reader \\(one of r1, r2\\)"):
        predict_main(["--adapter", str(out), text])
    with pytest.raises(ValueError, match="term 'boson' does not occur in the abstract"):
        predict_main(["--adapter", str(out), "--reader", "r1", "--term", "boson", text])


def test_bad_data_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("entity,abstract\nx,y\n")
    with pytest.raises(DataError, match=f"{bad}: missing column"):
        P.main(["--data", str(bad), "--output-dir", str(tmp_path / "o")])
    missing = tmp_path / "nope.csv"
    assert friendly(P.main, ["--data", str(missing), "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {missing}: data file not found\n"
    broken = tmp_path / "r.jsonl"
    broken.write_text('{"reader": "a"\n')
    with pytest.raises(DataError, match=f"{broken} line 1: not valid JSON"):
        P.main(["--data", str(broken), "--output-dir", str(tmp_path / "o")])
    public = write_public(tmp_path / "entity_public_for_repo.csv")
    with pytest.raises(DataError, match=f"{public}: the public entity file has candidate terms but no familiarity "
                                        "labels; pass --simulate-readers"):
        P.main(["--data", str(public), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--baselines: unknown \\['gpt4'\\]"):
        P.main(["--baselines", "gpt4", "--output-dir", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "metrics.json").exists()


PUBLIC = [("s1", "Medicine", "Patients with apical periodontitis received a root canal treatment.", ["apical periodontitis", "root canal"]),
          ("s2", "Physics", "Bulk localization of phonons in a disordered lattice.", ["phonons", "disordered lattice"]),
          ("s3", "Economics,Sociology", "Implied volatility and labor supply in households.", ["implied volatility", "labor supply"])]


def write_public(path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[f"entity_{i}" for i in range(1, 11)] + ["paper_sha", "title", "abstract",
                                                                                   "s2fieldsofstudy"])
        w.writeheader()
        for sha, field, abstract, terms in PUBLIC:
            w.writerow({"paper_sha": sha, "title": "t", "abstract": abstract, "s2fieldsofstudy": field,
                        **{f"entity_{i + 1}": t for i, t in enumerate(terms)}})
    return path


def test_simulated_readers_know_the_terms_of_their_field_family(tmp_path):
    docs, readers = P.simulated_docs(write_public(tmp_path / "p.csv"), 3)
    assert sorted(readers) == ["sim-life", "sim-physical", "sim-social"] and all(m["simulated"] for m in readers.values())
    jargon = {(d.reader, d.doc_id): {e.jargon for e in d.entities} for d in docs}
    assert jargon == {("sim-life", "s1"): {False}, ("sim-life", "s2"): {True}, ("sim-life", "s3"): {True},
                      ("sim-physical", "s1"): {True}, ("sim-physical", "s2"): {False}, ("sim-physical", "s3"): {True},
                      ("sim-social", "s1"): {True}, ("sim-social", "s2"): {True}, ("sim-social", "s3"): {False}}
    d = next(d for d in docs if d.reader == "sim-life" and d.doc_id == "s1")
    assert d.profile == "reader sim-life; background Medicine, Biology" and d.entities[1].spans == [(6, 8)]
    with pytest.raises(DataError, match="--simulate-readers must be 1..3"):
        P.simulated_docs(tmp_path / "p.csv", 4)


def test_shared_prefix_scoring_and_training_equal_the_full_prompts(run):
    _, _, _, train, test = run
    from shared import backbones

    def fresh():
        model = backbones.create("tiny-llama-lm", seed=0).eval()
        torch.manual_seed(0)
        G.attach_lora(model, r=4, alpha=8)
        return G.YesNoScorer(model, G.ByteTokenizer())

    items = [(q, True) for q in test[:12]] + [(q, False) for q in test[:3]]
    a, b = fresh(), fresh()
    torch.testing.assert_close(torch.tensor(a.score_shared(items)), torch.tensor(a.score(items)), atol=1e-5, rtol=0)
    assert len(a.groups(items)) == 3  # r1 on the first abstract (9), r2 on it (3), the 3 without reader line
    mine = [(q, True) for q in train if q.reader == "r1"][:9]  # one abstract: one group, so the same batches
    la = G.train_yes_no(a, mine, steps=3, lr=5e-2, batch_size=9, shared_prefix=True)
    lb = G.train_yes_no(b, mine, steps=3, lr=5e-2, batch_size=9, shared_prefix=False)
    np.testing.assert_allclose(la, lb, atol=1e-5)


def test_candidate_terms_without_a_tagger():
    text = ("We study the ribosome and apoptosis using a data set. Dynamic no-arbitrage arguments constrain "
            "the risk-neutral drift over an 11-year period.")
    assert prompts.candidate_terms(text) == ["ribosome", "apoptosis", "data set", "Dynamic no-arbitrage arguments",
                                       "constrain", "risk-neutral drift", "11-year period"]
