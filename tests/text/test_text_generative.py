"""Generative path on a tiny random Llama causal LM: the study's prompt, constrained yes / no scoring,
prompting baselines, per-reader LoRA from a shared start, and mixed-reader batches."""
from __future__ import annotations

import pytest
import torch

from shared import backbones
from text import backbone as _  # noqa: F401  registers tiny-llama-lm
from text import generative as G
from text import prompts
from text.data import read_annotations, split_docs

from .fixtures import write_annotations


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    docs, _ = read_annotations(write_annotations(tmp_path_factory.mktemp("g") / "a.csv"))
    sp = split_docs(docs, "abstract", test=["p3"], val=0)
    model = backbones.create("tiny-llama-lm", seed=0).eval()
    G.attach_lora(model, r=4, alpha=8)
    scorer = G.YesNoScorer(model, G.ByteTokenizer())
    return scorer, prompts.queries_of(sp["train"]), prompts.queries_of(sp["test"])


def test_prompt_holds_abstract_entity_and_reader(setup):
    _, train, _ = setup
    q = train[0]
    p = prompts.prompt(q)
    assert p.startswith(f"Abstract: {q.abstract}\nReader: reader 1; background biology")
    assert p.endswith(f'Question: is the term "{q.entity}" jargon for this reader, that is, would they need it explained '
                      "to understand the abstract? Answer yes or no.\nAnswer:")
    assert "Reader:" not in prompts.prompt(q, with_reader=False)
    assert G.answer_ids(G.ByteTokenizer()) == ([3 + ord(" ")], 3 + ord("y"), 3 + ord("n"))


def test_constrained_score_is_the_log_prob_difference(setup):
    scorer, train, _ = setup
    items = [(q, True) for q in train[:3]]
    batch = scorer.batch(items)
    with torch.no_grad():
        logits = scorer.model(**batch).logits
    for i, (q, _) in enumerate(items):
        n = len(scorer.ids(q))
        logp = logits[i, n - 1].log_softmax(-1)
        assert scorer.score([items[i]])[0] == pytest.approx(float(logp[3 + ord("y")] - logp[3 + ord("n")]), abs=1e-5)


def test_baselines_add_the_right_context(setup):
    _, train, test = setup
    q = test[0]
    got = {k: prompts.with_baseline([q], k, train)[0] for k in prompts.BASELINES}
    assert got["vanilla"] == (q, False) and got["metadata"][0].context == "" and got["metadata"][1]
    assert got["profile"][0].context.startswith("Terms this reader knew: ")
    assert "a reader with a similar background" in got["nearest_annotator"][0].context
    assert got["nearest_abstract"][0].context.startswith("A related abstract this reader read: ")
    assert prompts.nearest_annotators({"a": train[:9], "b": train[9:]}) == {"a": "b", "b": "a"}
    with pytest.raises(ValueError, match="unknown baseline 'gpt'"):
        prompts.with_baseline([q], "gpt", train)


def test_reader_adapters_switch_and_mixed_batch_equals_one_at_a_time(setup):
    scorer, train, test = setup
    torch.manual_seed(0)
    bank = G.personalise(scorer, train, shared_steps=4, reader_steps=4, lr=5e-2, batch_size=4)
    assert sorted(bank.states) == ["1", "2", "__shared__"]
    key = next(k for k in bank.states["1"] if "lora_B" in k)
    assert not torch.equal(bank.states["1"][key], bank.states["2"][key])  # the readers' adapters differ
    queries = test + test[:2]  # 8 queries, both readers interleaved
    mixed = G.score_readers(scorer, bank, queries, batch_size=8)
    one = []
    for q in queries:
        bank.use(q.reader)  # switch adapters in place, no reload
        one += scorer.score([(q, True)])
    torch.testing.assert_close(torch.tensor(mixed), torch.tensor(one), atol=1e-5, rtol=0)
    bank.use("__shared__")
    shared = scorer.score([(q, True) for q in queries])
    assert max(abs(a - b) for a, b in zip(mixed, shared)) > 1e-4  # personalisation changed the answers
    with pytest.raises(ValueError, match=r"unknown reader\(s\) \['9'\]"):
        with bank.mixed(["9"]):
            pass


def test_training_fits_the_yes_no_labels(setup):
    scorer, train, _ = setup
    four = [q for q in train if q.reader == "1" and q.gold][:2] + [q for q in train if q.reader == "1" and not q.gold][:2]  # 1 jargon + 2 known
    items = [(q, True) for q in four]
    losses = G.train_yes_no(scorer, items, steps=30, lr=1e-1, batch_size=4)
    assert losses[-1] < 0.6 * losses[0]
    assert [m > 0 for m in scorer.score(items)] == [q.gold for q in four] and any(q.gold for q in four)


def test_long_prompt_is_windowed_around_the_entity(setup):
    scorer, train, _ = setup
    q = train[0]
    long = prompts.Query(q.reader, q.profile, "filler words here. " * 200 + q.abstract + " more text." * 50, q.entity, q.gold)
    small = G.YesNoScorer(scorer.model, scorer.tok, max_length=400)
    ids = small.ids(long)
    assert len(ids) <= 400
    assert q.entity in G.ByteTokenizer().decode(ids) and "Question:" in G.ByteTokenizer().decode(ids)


def test_a_gguf_that_is_not_llama_class_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="a 'gpt2' model, not a Llama-class decoder"):
        backbones.create("hf-causal-lm", checkpoint=str(tmp_path))
