"""Data layouts: PersonalizedJargon annotations, the JSONL layout, splits, the few-labels regime, ACTER."""
from __future__ import annotations

import pytest

from text import data as D
from text.datamodules import ActerDataModule, JargonDataModule

from .fixtures import ABSTRACTS, write_acter, write_annotations, write_jsonl


def test_annotations_group_by_reader_and_abstract(tmp_path):
    docs, readers = D.read_annotations(write_annotations(tmp_path / "a.csv"))
    assert len(docs) == 6 and sorted(readers) == ["1", "2"]
    d = next(d for d in docs if d.reader == "2" and d.doc_id == "p2")
    assert [(e.text, e.jargon) for e in d.entities] == [("ribosome", True), ("apoptosis", True), ("data set", False)]
    assert d.profile == "reader 2; background finance; 10 papers; publishing since 2015"
    assert d.entities[0].extra == {"additional_definition": True, "additional_background": True, "additional_example": False}
    # word tags: B on every jargon entity word, O elsewhere
    tags = d.word_tags()
    assert [d.words[i] for i, t in enumerate(tags) if t == D.B] == ["ribosome", "apoptosis"]
    assert [d.words[i] for i, t in enumerate(tags) if t == D.I] == []


def test_threshold_changes_what_is_jargon(tmp_path):
    path = write_annotations(tmp_path / "a.csv")
    n1 = sum(e.jargon for d in D.read_annotations(path, threshold=1)[0] for e in d.entities)
    n2 = sum(e.jargon for d in D.read_annotations(path, threshold=2)[0] for e in d.entities)
    assert (n1, n2) == (7, 9)


def test_multiword_entity_tags_b_then_i(tmp_path):
    docs, _ = D.read_annotations(write_annotations(tmp_path / "a.csv"))
    d = next(d for d in docs if d.reader == "1" and d.doc_id == "p1")
    tags = d.word_tags()
    i = d.words.index("implied")
    assert tags[i:i + 2] == [D.B, D.I]
    assert tags[d.words.index("option")] == D.O  # familiarity 2 is not jargon at threshold 1


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.__setitem__(0, ("1", "p1", "dark matter", 1)), "'dark matter' does not occur in its abstract"),
])
def test_entity_not_in_abstract_names_file_and_line(tmp_path, edit, message):
    from .fixtures import ROWS

    rows = list(ROWS)
    edit(rows)
    path = write_annotations(tmp_path / "a.csv", rows)
    with pytest.raises(D.DataError, match=f"a.csv line 2, column 'entity': entity {message}"):
        D.read_annotations(path)
    docs, _ = D.read_annotations(path, missing_entities="skip")
    assert sum(len(d.entities) for d in docs) == len(ROWS) - 1


def test_missing_column_and_empty_abstract(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("entity,paper_sha,abstract,annotator\nx,p,x,1\n")
    with pytest.raises(D.DataError, match=r"bad.csv: missing column\(s\) \['familiarity'\]"):
        D.read_annotations(p)
    p.write_text("entity,paper_sha,abstract,familiarity,annotator\nx,p,  ,1,1\n")
    with pytest.raises(D.DataError, match="bad.csv line 2: empty abstract"):
        D.read_annotations(p)


def test_jsonl_layout_and_its_errors(tmp_path):
    rec = {"reader": "new", "abstract": ABSTRACTS["p2"], "terms": ["ribosome", "data set"], "jargon": ["ribosome"],
           "domain": "law"}
    docs, readers = D.read_jsonl(write_jsonl(tmp_path / "n.jsonl", [rec]))
    assert readers == {"new": {"domain": "law"}} and docs[0].profile == "reader new; background law"
    assert [(e.text, e.jargon) for e in docs[0].entities] == [("ribosome", True), ("data set", False)]
    with pytest.raises(D.DataError, match=r"n.jsonl line 1: field 'jargon' lists \['boson'\]"):
        D.read_jsonl(write_jsonl(tmp_path / "n.jsonl", [{**rec, "jargon": ["boson"]}]))
    with pytest.raises(D.DataError, match="n.jsonl line 1: missing field 'terms'"):
        D.read_jsonl(write_jsonl(tmp_path / "n.jsonl", [{k: v for k, v in rec.items() if k != "terms"}]))
    with pytest.raises(D.DataError, match="n.jsonl line 1: field 'abstract' is empty"):
        D.read_jsonl(write_jsonl(tmp_path / "n.jsonl", [{**rec, "abstract": " "}]))
    with pytest.raises(D.DataError, match="n.jsonl line 1, field 'terms': entity 'boson' does not occur"):
        D.read_jsonl(write_jsonl(tmp_path / "n.jsonl", [{**rec, "terms": ["boson"], "jargon": []}]))


def test_splits_by_abstract_and_by_reader(tmp_path):
    docs, _ = D.read_annotations(write_annotations(tmp_path / "a.csv"))
    s = D.split_docs(docs, "abstract", test=["p3"], val=["p2"])
    assert {d.doc_id for d in s["test"]} == {"p3"} and {d.doc_id for d in s["train"]} == {"p1"}
    assert {d.reader for d in s["test"]} == {"1", "2"}  # the same readers, an unseen abstract
    s = D.split_docs(docs, "reader", test=["2"], val=0)
    assert {d.reader for d in s["test"]} == {"2"} and {d.reader for d in s["train"]} == {"1"} and not s["val"]
    with pytest.raises(D.DataError, match=r"test_readers: unknown reader id\(s\) \['9'\]"):
        D.split_docs(docs, "reader", test=["9"])


def test_label_fraction_hides_labels_per_reader(tmp_path):
    docs, _ = D.read_annotations(write_annotations(tmp_path / "a.csv"))
    kept = D.keep_label_fraction(docs, 0.34, seed=1)
    per = {r: sum(e.jargon is not None for d in docs if d.reader == r for e in d.entities) for r in ("1", "2")}
    assert kept == 6 and per == {"1": 3, "2": 3}
    d = next(d for d in docs if any(e.jargon is None for e in d.entities))
    hidden = next(e for e in d.entities if e.jargon is None)
    s, t = hidden.spans[0]
    assert d.word_tags()[s:t] == [D.IGNORE] * (t - s)  # hidden labels add no loss


def test_acter_layout_cross_domain(tmp_path):
    root = write_acter(tmp_path / "acter")
    docs = D.read_acter_file(next((root / "en/htfl").rglob("*_01_seq_terms.tsv")), "htfl")
    assert docs[0].words[:2] == ["Heart", "failure"] and D.doc_terms(docs[0]) == {"heart failure", "patients", "diuretics"}
    dm = ActerDataModule(root=str(root), test_domain="htfl", val_fraction=0, tokenizer={"kind": "hash", "vocab_size": 64})
    dm.setup()
    assert {d.domain for d in dm.docs("train")} == {"corp", "equi", "wind"} and len(dm.docs("test")) == 2
    assert dm.gold == {"heart failure", "patients", "diuretics", "ejection fraction", "nyha class"}  # the unique list
    assert D.doc_terms(dm.docs("train")[0]) <= {"bribery", "money laundering", "anti - corruption laws", "rider",
                                                  "half pass", "wind turbines", "blades"}
    with pytest.raises(D.DataError, match="unknown ACTER domain 'bio'"):
        ActerDataModule(root=str(root), test_domain="bio").setup()
    bad = next((root / "en/wind").rglob("*.tsv"))
    bad.write_text("Wind\tX\n")
    with pytest.raises(D.DataError, match=r"wind_en_01_seq_terms.tsv line 1: expected 'token<TAB>B\|I\|O'"):
        D.read_acter_file(bad, "wind")


def test_spans_of_iob():
    assert D.spans_of([D.O, D.B, D.I, D.O, D.I, D.B, D.B]) == [(1, 3), (4, 5), (5, 6), (6, 7)]


def test_jargon_datamodule_reads_a_folder(tmp_path):
    write_annotations(tmp_path / "d" / "annotations.csv")
    dm = JargonDataModule(root=str(tmp_path / "d"), test=["p3"], val=0, tokenizer={"kind": "hash", "vocab_size": 64})
    assert dm.preprocessing["readers"] == {"1": "reader 1; background biology; 10 papers; publishing since 2015",
                                           "2": "reader 2; background finance; 10 papers; publishing since 2015"}
    assert len(dm.docs("train")) == 4 and len(dm.docs("test")) == 2
    with pytest.raises(D.DataError, match="holds no annotations.csv or annotations.jsonl"):
        JargonDataModule(root=str(tmp_path)).setup()
