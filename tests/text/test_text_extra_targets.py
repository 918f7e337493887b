"""Extra targets (`data.extra_targets`): the PersonalizedJargon additional-information labels (did the
reader want a definition / background / an example for this entity) as extra per-token outputs of the
encoder path: the loss, the metrics, learning, bundles and input errors."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import peft
from text import data as D
from text.datamodules import JargonDataModule
from text.module import TaggerModule, extra_loss
from text.tagger import (HashTokenizer, entity_score, TokenHead, WindowEncoder, collate, extra_decisions, extra_metrics, word_outputs,
                         word_probs)

from .fixtures import ABSTRACTS, COLUMNS, write_annotations, write_jsonl

TINY = {"hidden_size": 32, "layers": 2, "heads": 4, "vocab_size": 256}
TARGETS = ["definition", "background", "example"]
COLS = ["additional_definition", "additional_background", "additional_example"]

# (reader, paper, entity, familiarity, definition, background, example); "" = no label
ROWS = [("1", "p2", "ribosome", 1, 1, 0, ""), ("1", "p2", "apoptosis", 2, 0, 1, 1),
        ("1", "p2", "data set", 5, "", "", ""), ("2", "p2", "ribosome", 5, 0, 0, ""),
        ("2", "p2", "apoptosis", 5, 0, 0, 0), ("2", "p2", "data set", 5, 0, "", "")]


def write_rows(path: Path, rows=ROWS, columns=COLUMNS) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for reader, paper, entity, fam, d, b, e in rows:
            w.writerow({"entity": entity, "paper_sha": paper, "abstract": ABSTRACTS[paper], "familiarity": fam,
                        "annotator": reader, "additional_definition": d, "additional_background": b,
                        "additional_example": e})
    return path


def test_loss_ignores_entities_without_the_label(tmp_path):
    docs, _ = D.read_annotations(write_rows(tmp_path / "a.csv"), extra_targets=TARGETS)
    d = next(d for d in docs if d.reader == "1")
    assert d.entities[0].extra == {"additional_definition": True, "additional_background": False}  # example: empty
    tags = d.extra_tags(COLS)
    i, j, k = d.words.index("ribosome"), d.words.index("apoptosis"), d.words.index("data")
    assert tags[i][:2] == [1.0, 0.0] and math.isnan(tags[i][2]) and tags[j] == [0.0, 1.0, 1.0]
    assert all(math.isnan(v) for v in tags[k] + tags[k + 1] + tags[0])  # no label: no target
    enc = WindowEncoder(HashTokenizer(256), max_length=32, reader_prefix=False)
    inputs, labels, extra = collate(enc.encode(d.words, "", d.word_tags(), tags), enc.tok.pad_id)
    assert extra.shape == (*labels.shape, 3) and int((~extra.isnan()).sum()) == 5
    pos = enc.encode(d.words)[0].positions
    # hand-made logits: 0 for the tags; extra logits 2 / -1 on ribosome, 0 on apoptosis, large everywhere else
    logits = torch.zeros(*labels.shape, 6)
    logits[..., 3:] = 50.0
    logits[0, pos[i], 3:] = torch.tensor([2.0, -1.0, 50.0])
    logits[0, pos[j], 3:] = 0.0
    logits.requires_grad_(True)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    bce = (softplus(-2.0) + softplus(-1.0) + 3 * math.log(2)) / 5  # the five labelled (word, target) pairs
    assert extra_loss(logits[..., 3:], extra).item() == pytest.approx(bce, abs=1e-6)
    m = TaggerModule("tiny-bert", TINY, [], labels=D.TAGS, preprocessing={"extra_targets": TARGETS}, extra_weight=0.5)
    total, part = m.loss(logits, labels, extra)
    assert part.item() == pytest.approx(bce, abs=1e-6)
    assert total.item() == pytest.approx(math.log(3) + 0.5 * bce, abs=1e-6)  # uniform tag logits: CE = log 3
    total.backward()
    grad = logits.grad[0, :, 3:]
    labelled = torch.zeros_like(grad, dtype=torch.bool)
    labelled[pos[i], :2] = labelled[pos[j], :] = True
    assert (grad[~labelled] == 0).all() and (grad[labelled] != 0).all()
    # a batch without any labelled pair adds 0, not NaN
    assert extra_loss(logits[..., 3:], torch.full_like(extra, float("nan"))).item() == 0.0


def test_hidden_labels_add_no_extra_loss(tmp_path):
    docs, _ = D.read_annotations(write_rows(tmp_path / "a.csv"), extra_targets=TARGETS)
    D.keep_label_fraction(docs, 0.34, seed=0)
    for d in docs:
        tags = d.extra_tags(COLS)
        for e in d.entities:
            if e.jargon is None:  # hidden: its additional-information labels are hidden too
                assert e.extra == {} and all(math.isnan(v) for s, t in e.spans for w in tags[s:t] for v in w)


def test_metrics_by_hand():
    def doc(reader, labels):
        ents = [D.Entity(t, [(a, b)], True, extra=x) for t, (a, b), x in labels]
        return D.Doc(["a", "b", "c", "d", "e"], "p", reader, entities=ents)

    c = "additional_definition"
    docs = [doc("1", [("a b", (0, 2), {c: True}), ("c", (2, 3), {c: False}), ("d", (3, 4), {})]),
            doc("2", [("a b", (0, 2), {c: True}), ("c", (2, 3), {c: True}), ("e", (4, 5), {c: False})])]
    probs = [np.array([[0.8], [0.3], [0.6], [0.9], [0.1]]),  # r1: a b -> 0.55 (yes), c 0.6 (yes), d unlabelled
             np.array([[0.2], [0.6], [0.9], [0.0], [0.4]])]  # r2: a b -> 0.4 (no), c 0.9 (yes), e 0.4 (no)
    rows = extra_decisions(docs, probs, [c])[c]
    assert [(r["reader"], r["entity"], r["gold"], r["pred"]) for r in rows] == [
        ("1", "a b", True, True), ("1", "c", False, True), ("2", "a b", True, False), ("2", "c", True, True),
        ("2", "e", False, False)]
    assert rows[0]["score"] == pytest.approx(0.55)
    m = extra_metrics(rows)
    # overall: tp 2, fp 1, fn 1 -> P = R = F1 = 2/3; r1: P 1/2, R 1, F1 2/3; r2: P 1, R 1/2, F1 2/3
    assert (m["precision"], m["recall"], m["f1"]) == (pytest.approx(2 / 3),) * 3
    assert m["f1_reader/1"] == pytest.approx(2 / 3) and m["f1_reader/2"] == pytest.approx(2 / 3)
    assert m["macro_precision"] == pytest.approx(0.75) and m["macro_recall"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1_all_yes"] == pytest.approx(2 * 0.6 / 1.6) and m["n"] == 5  # 3 of 5 gold yes: P 0.6, R 1


@pytest.fixture(scope="module")
def learnt(tmp_path_factory):
    """A tiny BERT (fully fine-tuned, 64 wide) trained on the synthetic corpus with its SIMULATED
    additional-information labels, two readers of different fields, tested on unseen abstracts."""
    from text import synthetic

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("extra")
    rows = [r for r in synthetic.make_rows(16, seed=0) if r["annotator"] in ("r1", "r4")]
    with open(root / "annotations.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=synthetic.COLUMNS)
        w.writeheader()
        w.writerows(rows)
    dm = JargonDataModule(root=str(root), test=0.25, val=0, tokenizer={"kind": "hash", "vocab_size": 256},
                          max_length=64, batch_size=4, extra_targets=["definition"])
    m = TaggerModule("tiny-bert", {**TINY, "hidden_size": 64}, [{"name": "full"}], labels=D.TAGS,
                     preprocessing=dm.preprocessing, o_weight=0.5)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(18):
        for inputs, labels, extra in dm.train_dataloader():
            loss, _ = m.loss(m(inputs), labels, extra)
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    return m, dm, root


def test_training_learns_the_extra_target_above_trivial_baselines(learnt):
    m, dm, _ = learnt
    docs = dm.docs("test")
    out = word_outputs(m.model, dm.encoder, [(d.words, d.profile) for d in docs])
    assert out[0].shape == (len(docs[0].words), 4)
    rows = extra_decisions(docs, [o[:, 3:] for o in out], m.extra_columns)["additional_definition"]
    got = extra_metrics(rows)
    base_rate = np.mean([r["gold"] for r in rows])
    assert got["n"] > 40
    assert got["f1"] > got["f1_all_yes"] + 0.05, got  # better than answering yes for every entity
    assert got["accuracy"] > max(base_rate, 1 - base_rate) + 0.05, got  # and than the majority answer


def test_bundle_round_trip_with_and_without_extra_targets(learnt, tmp_path):
    from text.predict import JargonTagger

    m, dm, root = learnt
    m.save_bundle(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "adapter.json").read_text())
    assert meta["head"]["extra_targets"] == ["additional_definition"]
    assert meta["preprocessing"]["extra_targets"] == ["definition"]
    assert meta["tensors"]["head.extra.weight"]["shape"] == [1, 64]
    loaded = peft.from_bundle(tmp_path / "b").eval()
    assert isinstance(loaded.head, TokenHead) and loaded.head.extra_targets == ["additional_definition"]
    docs = [(d.words, d.profile) for d in dm.docs("test")[:3]]
    for a, b in zip(word_outputs(m.model, dm.encoder, docs), word_outputs(loaded, dm.encoder, docs)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    tagger = JargonTagger(tmp_path / "b")  # text.predict reads the tag probabilities only
    d = dm.docs("test")[0]
    assert word_probs(tagger.model, tagger.encoder, [(d.words, d.profile)])[0].shape == (len(d.words), 3)
    e = d.entities[0]
    (row,) = tagger.tag(d.text, reader=d.reader, terms=[e.text])
    # predict reports each extra target as the mean probability over the term's words (best occurrence)
    a, b = max(e.spans, key=lambda sp: entity_score(word_probs(m.model, dm.encoder, [(d.words, d.profile)])[0], [sp]))
    want = float(word_outputs(m.model, dm.encoder, [(d.words, d.profile)])[0][a:b, 3].mean())
    assert (row["start"], row["end"]) == (a, b) and row["extra"] == {"definition": pytest.approx(want, abs=1e-6)}
    from text import predict as P

    assert P.main(["--adapter", str(tmp_path / "b"), "--reader", d.reader, "--term", e.text, "--all", d.text]) == 0
    # keep training from the bundle: its extra targets must be the data's
    again = TaggerModule("tiny-bert", {**TINY, "hidden_size": 64}, labels=D.TAGS, preprocessing=dm.preprocessing,
                         init_bundle=str(tmp_path / "b"))
    assert again.model.head.extra_targets == ["additional_definition"]
    with pytest.raises(ValueError, match=r"extra targets \['additional_definition'\] differ from the data's \[\]"):
        TaggerModule("tiny-bert", {**TINY, "hidden_size": 64}, labels=D.TAGS, preprocessing={},
                     init_bundle=str(tmp_path / "b"))
    # without extra targets: the head, its config and its tensors are as before
    plain = TaggerModule("tiny-bert", TINY, [{"name": "lora", "r": 2, "targets": ["query"]}], labels=D.TAGS,
                         preprocessing={"readers": {}})
    plain.save_bundle(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "adapter.json").read_text())
    assert meta["head"] == {"kind": "token", "dim": 32, "num_classes": 3, "dropout": 0.0}
    assert sorted(k for k in meta["tensors"] if k.startswith("head.")) == ["head.fc.bias", "head.fc.weight"]
    assert peft.from_bundle(tmp_path / "p").head.extra_targets == []


def test_demo_cli_with_extra_targets_writes_per_target_metrics(tmp_path):
    from text.train import main as train_main

    train_main(["--data.root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"),
                "--trainer.max_epochs", "1", "--data.init_args.test", "0.5",
                "--data.init_args.extra_targets", "[definition, background, example]"])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for t in TARGETS:
        for k in ("f1", "precision", "recall", "macro_f1", "macro_precision", "macro_recall", "f1_reader/r1"):
            assert 0 <= saved[f"test/{t}/{k}"] <= 1, (t, k)
    assert 0 <= saved["test/f1"] <= 1 and "extra targets definition/background/example" in saved["protocol"]
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())
    assert meta["head"]["extra_targets"] == COLS and meta["preprocessing"]["extra_targets"] == TARGETS


def test_missing_column_and_bad_value_name_the_file_and_field(tmp_path):
    p = write_rows(tmp_path / "a.csv", columns=[c for c in COLUMNS if c != "additional_background"])
    with pytest.raises(D.DataError, match=r"a.csv: missing column\(s\) \['additional_background'\] "
                                          r"\(data.extra_targets \['definition', 'background'\] reads them\)"):
        D.read_annotations(p, extra_targets=["definition", "background"])
    assert D.read_annotations(p, extra_targets=["definition"])[0]  # the other targets' columns are not needed
    assert D.read_annotations(p)[0]  # nor without extra targets (as before)
    bad = list(ROWS)
    bad[2] = ("1", "p2", "data set", 5, "maybe", "", "")
    p = write_rows(tmp_path / "b.csv", bad)
    with pytest.raises(D.DataError, match=r"b.csv line 4, column 'additional_definition': 'maybe' is not a yes / no"):
        D.read_annotations(p, extra_targets=TARGETS)
    p = write_rows(tmp_path / "c.csv", [r[:6] + ("",) for r in ROWS])
    with pytest.raises(D.DataError, match="c.csv: column 'additional_example' is empty in every row"):
        D.read_annotations(p, extra_targets=TARGETS)
    with pytest.raises(D.DataError, match="data.extra_targets: unknown target 'glossary'; known: definition, backgr"):
        JargonDataModule(root=str(p), extra_targets=["glossary"])
    j = write_jsonl(tmp_path / "n.jsonl", [{"reader": "1", "abstract": ABSTRACTS["p2"], "terms": ["ribosome"],
                                            "jargon": []}])
    with pytest.raises(D.DataError, match="n.jsonl: the JSONL layout has no additional-information labels"):
        JargonDataModule(root=str(j), extra_targets=["definition"]).setup()
    # the data module reads the fixture of the other tests with all three targets
    dm = JargonDataModule(root=str(write_annotations(tmp_path / "f.csv")), test=["p3"], val=0,
                          tokenizer={"kind": "hash", "vocab_size": 64}, extra_targets=TARGETS)
    assert dm.preprocessing["extra_targets"] == TARGETS
    assert len(next(iter(dm.train_dataloader()))) == 3
