"""Encoder path: windows (long texts are windowed, never truncated), the token head with LoRA,
entity-level metrics, learning, and the bundle round trip through text.predict."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from text import data as D
from text.datamodules import JargonDataModule
from text.module import TaggerModule
from text.predict import JargonTagger, main as predict_main
from text.tagger import (HashTokenizer, WindowEncoder, decision_metrics, entity_score, span_score, tag_spans,
                         term_metrics, word_probs)

from .fixtures import ABSTRACTS, write_annotations

TINY = {"hidden_size": 32, "layers": 2, "heads": 4, "vocab_size": 256}


def test_windows_cover_every_word_within_the_context():
    enc = WindowEncoder(HashTokenizer(256), max_length=20, overlap=2)
    words = [f"w{i}" for i in range(30)]
    wins = enc.encode(words, profile="reader 1; background law", tags=list(range(30)))
    pre = len(enc.prefix_ids("reader 1; background law"))
    assert pre == 5 and all(len(w.input_ids) <= 20 for w in wins)
    budget = 20 - pre - 3  # [CLS] prefix [SEP] words [SEP]
    assert [(w.start, w.end) for w in wins] == [(0, budget), (budget - 2, 2 * budget - 2), (2 * budget - 4, 30)]
    assert wins[-1].end == 30
    # labels sit on each word's token, nothing else is supervised
    w = wins[1]
    assert [w.labels[p] for p in w.positions] == list(range(w.start, w.end))
    assert sum(lab != D.IGNORE for lab in w.labels) == w.end - w.start
    assert w.token_type_ids[:pre + 2] == [0] * (pre + 2) and set(w.token_type_ids[pre + 2:]) == {1}


def test_profile_longer_than_half_the_context_is_refused():
    enc = WindowEncoder(HashTokenizer(256), max_length=8)
    with pytest.raises(ValueError, match="reader profile .* more than half of max_length=8"):
        enc.encode(["a"], profile="reader 1; background biology and physics")
    with pytest.raises(ValueError, match="empty text"):
        enc.encode([], profile="")


class Constant(torch.nn.Module):
    """A 'model' whose B-vs-I log-odds at each token is the token's position in its window."""

    def forward(self, inputs):
        pos = torch.arange(inputs["input_ids"].shape[1]).float().expand(inputs["input_ids"].shape)
        return torch.stack([torch.zeros_like(pos), pos, torch.zeros_like(pos)], -1)

    def parameters(self, recurse=True):
        yield torch.zeros(1)


def test_long_text_each_word_from_its_most_central_window():
    enc = WindowEncoder(HashTokenizer(256), max_length=8, overlap=3, reader_prefix=False)
    words = [f"w{i}" for i in range(12)]
    wins = enc.encode(words)
    assert [(w.start, w.end) for w in wins] == [(0, 6), (3, 9), (6, 12)]
    probs = word_probs(Constant(), enc, [(words, "")])[0]
    assert probs.shape == (12, 3)
    # word j sits at token 1 + (j - start) of its window; a word takes the window where it is farthest from an
    # edge (ties: the earlier window): 4 -> (0, 6) [tie], 5 -> (3, 9), 6 -> (3, 9), 7 -> (3, 9) [tie], 8 -> (6, 12)
    pos_logit = np.log(probs[:, 1] / probs[:, 2])  # = the token position in the window that was used
    np.testing.assert_allclose(pos_logit[[0, 4, 5, 6, 7, 8, 11]], [1, 5, 3, 4, 5, 3, 6], atol=1e-5)


def test_entity_and_term_metrics_by_hand():
    probs = np.array([[1, 0, 0], [0.2, 0.7, 0.1], [0.4, 0.1, 0.5], [0.9, 0.05, 0.05]])
    assert span_score(probs, (1, 3)) == pytest.approx((0.8 + 0.6) / 2)
    assert entity_score(probs, [(3, 4), (1, 2)]) == pytest.approx(0.8)
    assert [(s["term"], s["start"], s["end"]) for s in tag_spans(["a", "b", "c", "d"], probs)] == [("b c", 1, 3)]
    rows = [{"reader": "1", "gold": True, "pred": True}, {"reader": "1", "gold": False, "pred": True},
            {"reader": "2", "gold": True, "pred": False}, {"reader": "2", "gold": True, "pred": True}]
    m = decision_metrics(rows)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["f1_reader/1"] == pytest.approx(2 / 3) and m["f1_reader/2"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.5)
    t = term_metrics({"heart failure", "stent", "patients"}, {"heart failure", "patients", "diuretics", "nyha class"})
    assert (t["precision"], t["recall"]) == (pytest.approx(2 / 3), 0.5) and t["f1"] == pytest.approx(4 / 7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny-bert + LoRA + token head trained on two readers of opposite backgrounds."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("jargon")
    write_annotations(root / "annotations.csv")
    dm = JargonDataModule(root=str(root), test=["p3"], val=0, tokenizer={"kind": "hash", "vocab_size": 256},
                          max_length=32, batch_size=4)
    m = TaggerModule("tiny-bert", TINY, [{"name": "lora", "r": 4, "alpha": 8, "targets": ["query", "value", "word_embeddings"]}],
                     labels=D.TAGS, preprocessing=dm.preprocessing, lr=1e-2)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(60):
        for inputs, labels in dm.train_dataloader():
            loss = torch.nn.functional.cross_entropy(m(inputs).flatten(0, 1), labels.flatten(), ignore_index=D.IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    m.eval()
    m.save_bundle(root / "bundle", metrics={"note": 1})
    return m, dm, root, losses


def test_tagger_learns_per_reader_jargon(trained):
    from text.tagger import entity_decisions

    m, dm, _, losses = trained
    assert np.mean(losses[-4:]) < 0.2 * np.mean(losses[:4])
    rows = entity_decisions(m.model, dm.encoder, dm.docs("train"))
    metrics = decision_metrics(rows)
    assert metrics["f1"] == 1.0 and metrics["accuracy"] == 1.0  # the training decisions are learnt
    # the same abstract, opposite decisions for the two readers
    by = {(r["reader"], r["entity"]): r["pred"] for r in rows}
    assert by[("1", "ribosome")] is False and by[("2", "ribosome")] is True
    assert by[("1", "implied volatility")] is True and by[("2", "implied volatility")] is False


def test_bundle_round_trip_and_predict_cli(trained, capsys):
    m, dm, root, _ = trained
    tagger = JargonTagger(root / "bundle")
    text = ABSTRACTS["p2"]
    words = text.replace(".", " .").split()
    assert tagger.readers == dm.preprocessing["readers"]
    ours = word_probs(m.model, dm.encoder, [(words, tagger.readers["2"])])[0]
    np.testing.assert_array_equal(word_probs(tagger.model, tagger.encoder, [(words, tagger.readers["2"])])[0], ours)
    got = tagger.tag(text, reader="2", terms=["ribosome", "data set"])
    assert [g["jargon"] for g in got] == [True, False]
    assert tagger.tag(text, reader="1", terms=["ribosome"])[0]["jargon"] is False
    assert ours.shape == (len(words), 3)
    assert predict_main(["--adapter", str(root / "bundle"), "--reader", "2", "--term", "ribosome", "--term", "data set",
                         "--all", text]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "1 of 2 terms marked as jargon for reader 2 (score >= 0.5):"
    assert out[1].endswith("\tjargon\tribosome") and out[2].endswith("\t-\tdata set")
    for kwargs, message in [({"reader": "9"}, "unknown reader '9'; this adapter knows 1, 2"),
                            ({"reader": None}, "this adapter is personalised: pass --reader"),
                            ({"reader": "1", "terms": ["boson"]}, "term 'boson' does not occur in the abstract")]:
        with pytest.raises(ValueError, match=message):
            tagger.tag(text, **kwargs)
    with pytest.raises(ValueError, match="empty abstract"):
        tagger.tag("  ", reader="1")


def test_predict_refuses_a_bundle_of_another_domain(tmp_path):
    from shared import backbones, peft
    from shared.heads import LinearHead

    net = peft.attach(backbones.create("tiny-vit", seed=0), [])
    peft.save(peft.Classifier(net, LinearHead(32, 2)), tmp_path / "b", labels=["a", "b"])
    with pytest.raises(ValueError, match="not a text tagger bundle"):
        JargonTagger(tmp_path / "b")
