"""Text metrics against their references: TermEval 2020's term match on ACTER (exact lowercased,
ACTER-normalised strings; the tokenised unique list), the per-reader jargon F1 (the study's
familiarity <= 1), and the definition every metrics.json / report names."""
import json

import pytest

from .fixtures import write_acter, write_annotations
from text import data as D
from text.datamodules import ActerDataModule, JargonDataModule
from text.tagger import acter_normalise, decision_metrics, prf, term_key, term_keyer, term_metrics, termeval_key


def test_acter_normalisation_and_the_termeval_key():
    # ACTER 1.5 README 5.6: NFC, U+2212 / U+2010 -> "-", curly / low double quotes and ",," -> '"',
    # curly single quotes, backtick, acute -> "'", "İ" -> "I", five problem characters removed
    assert acter_normalise("Na\u2010K\u2212ATPase \u201cpump\u201d ,,x'' \u2018y\u2019 `z\u00b4 \u0130 a\uf8eeb") == \
        'Na-K-ATPase "pump" "x" \'y\' \'z\' I ab'
    assert acter_normalise("cafe\u0301") == "caf\u00e9"  # NFC
    assert termeval_key("  Heart   Failure ") == "heart failure"
    assert termeval_key("C\u2019d") == "c'd" and termeval_key("\u0130NFUSION") == "infusion"
    # the reference match keeps punctuation and its spacing; the former term_key split it off
    assert termeval_key("heart-failure") != termeval_key("heart - failure")
    assert term_key("heart-failure") == term_key("heart - failure") == "heart - failure"
    assert term_keyer("reference") is termeval_key and term_keyer("original_list") is termeval_key
    assert term_keyer("term_key") is term_key
    with pytest.raises(ValueError, match="term match must be one of"):
        term_keyer("lemma")


def _layout(tmp_path):
    """The fixture ACTER, with an htfl sentence whose term the two lists spell differently (as
    ACTER's do: `angeli's salt` in the original list, `angeli 's salt` tokenised)."""
    root = write_acter(tmp_path / "acter")
    base = root / "en" / "htfl" / "annotated" / "annotations"
    f = base / "sequential_annotations" / "iob_annotations" / "without_named_entities" / "htfl_en_03_seq_terms.tsv"
    f.write_text("Angeli\tB\n's\tI\nsalt\tI\nhelps\tO\nHeart\tB\n-\tI\nfailure\tI\n.\tO\n\n")
    lists = base / "unique_annotation_lists"
    with open(lists / "htfl_en_terms.tsv", "a") as fh:
        fh.write("angeli's salt\tSpecific_Term\nheart-failure\tSpecific_Term\n")
    with open(lists / "htfl_en_tokenised_terms.tsv", "a") as fh:
        fh.write("angeli 's salt\tSpecific_Term\nheart - failure\tSpecific_Term\n")
    return root


@pytest.mark.parametrize("match,tp,n_gold", [
    # reference: exact strings vs the tokenised list: both new terms found
    ("reference", 6, 7),
    # the untokenised list TermEval 2020 scored: "angeli 's salt" != "angeli's salt", "heart - failure" != "heart-failure"
    ("original_list", 4, 7),
    # the former match: punctuation split off on both sides, so "angeli ' s salt" and "heart - failure" meet
    ("term_key", 6, 7),
])
def test_termeval_precision_recall_f1_by_hand(tmp_path, match, tp, n_gold):
    root = _layout(tmp_path)
    dm = ActerDataModule(root=str(root), test_domain="htfl", val_fraction=0, term_match=match,
                         tokenizer={"kind": "hash", "vocab_size": 64})
    dm.setup()
    assert len(dm.gold) == n_gold
    # a perfect tagger: the test sentences' gold tags (heart failure, patients, diuretics, ejection
    # fraction, angeli 's salt, heart - failure), keyed as the module's test stage keys them
    predicted = set().union(*(D.doc_terms(d, key=dm.term_key) for d in dm.docs("test")))
    assert len(predicted) == 6
    m = term_metrics(predicted, dm.gold_terms("test"))
    assert m["precision"] == pytest.approx(tp / 6) and m["recall"] == pytest.approx(tp / n_gold)
    assert m["f1"] == pytest.approx(2 * tp / (6 + n_gold))
    assert dm.metric_definition == ("reference" if match == "reference" else f"term_match={match}")


def test_term_match_errors_name_the_field_and_the_file(tmp_path):
    with pytest.raises(D.DataError, match="data.term_match must be one of"):
        ActerDataModule(root=str(tmp_path), term_match="lemma")
    root = write_acter(tmp_path / "acter")
    (root / "en/htfl/annotated/annotations/unique_annotation_lists/htfl_en_tokenised_terms.tsv").unlink()
    with pytest.raises(D.DataError, match="htfl_en_tokenised_terms.tsv: not found .*data.term_match: original_list"):
        ActerDataModule(root=str(root), test_domain="htfl", val_fraction=0).setup()


def test_per_reader_f1_and_macro_f1_by_hand():
    # reader a: tp 1, fp 1, fn 1 -> F1 1/2; reader b: tp 2, fp 0, fn 0 -> 1; reader c: no jargon held
    # out and none predicted -> 0 / 0 -> 0 (sklearn's zero_division=0); micro over all: tp 3, fp 1, fn 1
    rows = [{"reader": "a", "gold": True, "pred": True}, {"reader": "a", "gold": False, "pred": True},
            {"reader": "a", "gold": True, "pred": False}, {"reader": "b", "gold": True, "pred": True},
            {"reader": "b", "gold": True, "pred": True}, {"reader": "c", "gold": False, "pred": False}]
    m = decision_metrics(rows)
    assert (m["f1_reader/a"], m["f1_reader/b"], m["f1_reader/c"]) == (pytest.approx(0.5), 1.0, 0.0)
    assert m["macro_f1"] == pytest.approx(0.5)  # (1/2 + 1 + 0) / 3, unweighted over readers
    assert m["f1"] == pytest.approx(3 / 4) and m["precision"] == pytest.approx(3 / 4)
    assert prf(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_jargon_is_familiarity_at_most_one_and_the_definition_is_named(tmp_path):
    path = write_annotations(tmp_path / "annotations.csv")
    docs, _ = D.read_annotations(path)
    ents = [e for d in docs for e in d.entities]
    assert ents and all(e.jargon == (e.familiarity <= 1) for e in ents)
    assert any(e.familiarity == 2 and not e.jargon for e in ents)  # "slightly familiar" is not jargon
    assert JargonDataModule(root=str(path)).metric_definition == "reference"
    assert JargonDataModule(root=str(path), threshold=2).metric_definition == "jargon_threshold=2"


def test_text_report_names_the_definition(tmp_path):
    from text import report

    for i, (definition, f1) in enumerate([("reference", 0.5), ("term_match=term_key", 0.6)]):
        row = {"run": f"r{i}", "dataset": "acter-htfl", "method": "lora", "backbone": "tiny-bert",
               "test/f1": f1, "trainable_params": 10, "total_params": 100, "definition": definition,
               "config": {"data": {"init_args": {"term_match": definition}}}}
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "metrics.json").write_text(json.dumps(row))
    out = report.main([str(tmp_path)])
    assert "| metric definition |" in out and "| reference |" in out and "| term_match=term_key |" in out
    assert "50.00 ± 0.00" in out and "60.00 ± 0.00" in out  # never averaged together (55.00)
