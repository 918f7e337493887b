"""Issue 22 item 2 (text.predict takes several texts, their windows batched): the scores equal one
text at a time (long texts windowed, windows of several texts sharing forwards), each text's
results are headed by its name, and a text that cannot be used is named and skipped."""
from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch

from text import data as D
from text import predict
from text.tagger import word_outputs

from .test_predict_inputs import TINY

LONG = ("Difference-in-differences estimates of the minimum wage on employment use state-level panel data; "
        "the ribosome and apoptosis appear with implied volatility and a hedge ratio in a data set of "
        "seventy abstracts, while beta blockers treat chronic heart failure in patients of the trial. ") * 2


@pytest.fixture(scope="module")
def tagger_bundle(tmp_path_factory):
    """A tiny random term tagger with a short context (32 tokens), so a long text is several windows."""
    from text.module import TaggerModule

    torch.manual_seed(3)
    pre = {"tokenizer": {"kind": "hash", "vocab_size": 256}, "max_length": 32, "overlap": 4,
           "reader_prefix": False, "task": "terms"}
    m = TaggerModule("tiny-bert", TINY, [], labels=D.TAGS, preprocessing=pre)
    with torch.no_grad():
        torch.nn.init.normal_(m.model.head.fc.weight, std=2.0)
    path = tmp_path_factory.mktemp("tagger_batches") / "bundle"
    m.save_bundle(path, metrics={})
    return path


def _texts(tmp_path) -> list[str]:
    (tmp_path / "a.txt").write_text(LONG, encoding="utf-8")
    return ["We use the difference-in-differences estimator at the state-level.", f"@{tmp_path / 'a.txt'}",
            "Short abstract on the ribosome.", LONG[:170]]


def _scores(out: str) -> list[tuple[str, list[tuple[float, str]]]]:
    blocks = []
    for line in out.splitlines():
        if "\t" in line:
            score, _, term = line.split("\t")[:3]
            blocks[-1][1].append((float(score), term))
        else:
            blocks.append((line, []))
    return blocks


def test_windows_of_several_texts_batched_equal_one_at_a_time(tagger_bundle, tmp_path):
    tagger = predict.JargonTagger(tagger_bundle)
    texts = [predict.abstract_text(t) for t in _texts(tmp_path)]
    docs = [tagger.prepare(t) for t in texts]
    windows = [len(tagger.encoder.encode(d["words"])) for d in docs]
    assert max(windows) >= 4 and sum(windows) > len(texts)  # a long text, several windows
    one = [tagger.tag(t, threshold=0.0) for t in texts]
    with torch.inference_mode():
        want = [word_outputs(tagger.model, tagger.encoder, [(d["words"], "")], batch_size=1)[0] for d in docs]
        got = word_outputs(tagger.model, tagger.encoder, [(d["words"], "") for d in docs], batch_size=5)
    for a, b in zip(want, got):  # padded windows of other texts change nothing but float rounding
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    batched = tagger.tag_many(docs, "", threshold=0.0, batch_size=5)
    for a, b in zip(one, batched):
        assert [r["term"] for r in a] == [r["term"] for r in b] and a
        np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-5)


def test_cli_several_texts_headed_by_name_and_equal_to_one_by_one(tagger_bundle, tmp_path, capsys):
    texts = _texts(tmp_path)
    assert predict.main(["--adapter", str(tagger_bundle), "--all", "--batch-size", "3", "--workers", "1", *texts]) == 0
    batched = _scores(capsys.readouterr().out)
    heads = [h for h, _ in batched]
    assert [h.split(": ")[0] for h in heads] == ["text 1", str(tmp_path / "a.txt"), "text 3", "text 4"]
    assert all("candidate spans marked as terms (score >= 0.5):" in h for h in heads)
    for text, (head, rows) in zip(texts, batched):  # each equal to that text predicted on its own
        assert predict.main(["--adapter", str(tagger_bundle), "--all", "--batch-size", "1", "--workers", "0", text]) == 0
        (alone_head, alone_rows), = _scores(capsys.readouterr().out)
        assert head.endswith(alone_head)  # the one-text output is unchanged: no name
        assert [t for _, t in rows] == [t for _, t in alone_rows]
        np.testing.assert_allclose([s for s, _ in rows], [s for s, _ in alone_rows], atol=1.5e-3)


def test_a_bad_text_is_named_and_the_others_predicted(tagger_bundle, tmp_path, capsys):
    texts = _texts(tmp_path)
    (tmp_path / "latin.txt").write_bytes("données".encode("latin-1"))
    args = [texts[0], f"@{tmp_path / 'latin.txt'}", f"@{tmp_path / 'nope.txt'}", texts[2], "   "]
    assert predict.main(["--adapter", str(tagger_bundle), "--batch-size", "2", "--workers", "1", *args]) == 2
    out, err = capsys.readouterr()
    assert [h.split(": ")[0] for h, _ in _scores(out)] == ["text 1", "text 4"]
    assert err.splitlines() == [(f"error: {tmp_path / 'latin.txt'}: not UTF-8 text (byte 4: invalid continuation "
                                 f"byte); save the file as UTF-8"),
                                f"error: {tmp_path / 'nope.txt'}: file not found (@FILE reads the abstract from that file)",
                                "error: text 5: empty abstract: nothing to tag"]
    # --term must occur in every text: the one without it is named
    assert predict.main(["--adapter", str(tagger_bundle), "--term", "ribosome", texts[0], texts[2]]) == 2
    out, err = capsys.readouterr()
    assert err == "error: text 1: term 'ribosome' does not occur in the abstract\n"
    assert out.startswith("text 2: 1 of 1 candidate spans marked as terms")
    with pytest.raises(ValueError, match="^term 'ribosome' does not occur in the abstract$"):  # one text: as before
        predict.main(["--adapter", str(tagger_bundle), "--term", "ribosome", texts[0]])


def test_the_loader_can_be_sent_to_spawned_workers(tmp_path):
    load = pickle.loads(pickle.dumps(functools.partial(predict.load_text, terms=["ribosome"])))
    got = load(("text 1", "We study the ribosome."))
    assert got["words"][:3] == ["We", "study", "the"] and got["terms"] == [("ribosome", 1, [3])]
    with pytest.raises(ValueError, match="^text 2: term 'ribosome' does not occur"):
        load(("text 2", "Nothing here."))
