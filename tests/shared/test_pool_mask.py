"""Pooling respects the attention mask: a right-padded batch gives each sequence the logits of its
unpadded self (pool "last" used to read a pad token)."""
from __future__ import annotations

import torch

from shared import backbones, heads, peft
from shared.heads import Tokens


def test_masked_pooling_by_hand():
    x = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)  # token t of row b = [8b+2t, 8b+2t+1]
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    t = Tokens(x, 1, None, mask)
    # last real token: row 0 -> token 1 = [2, 3]; row 1 -> token 3 = [14, 15]
    assert t.pool("last").tolist() == [[2.0, 3.0], [14.0, 15.0]]
    # mean over real tokens: row 0 -> mean([0,1],[2,3]) = [1, 2]; row 1 -> mean of all four = [11, 12]
    assert t.pool("mean").tolist() == [[1.0, 2.0], [11.0, 12.0]]
    # patch_mean skips the prefix token: row 0 -> [2, 3]; row 1 -> mean(tokens 1..3) = [12, 13]
    assert t.pool("patch_mean").tolist() == [[2.0, 3.0], [12.0, 13.0]]
    assert t.pool("cls").tolist() == [[0.0, 1.0], [8.0, 9.0]]
    # without a mask, "last" reads the pad token of row 0: the bug this guards against
    assert Tokens(x, 1, None).pool("last").tolist() == [[6.0, 7.0], [14.0, 15.0]]
    # boolean masks work the same
    assert torch.equal(Tokens(x, 1, None, mask.bool()).pool("last"), t.pool("last"))


def _padded_vs_alone(name: str, pool: str):
    torch.manual_seed(0)
    model = peft.attach(backbones.create(name), [peft.LoRA(r=2, alpha=4, targets=["query", "value"]
                                                           if name == "tiny-bert" else ["q_proj", "v_proj"])])
    clf = peft.Classifier(model, heads.LinearHead(32, 3, pool=pool)).eval()
    with torch.no_grad():  # a head whose logits react to every feature
        clf.head.fc.weight.normal_()
    short = torch.tensor([[5, 17, 42, 9, 77]])
    other = torch.tensor([[3, 8, 13, 21, 34, 55, 89, 101]])
    ids = torch.cat([torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1), other])  # right padding
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    with torch.no_grad():
        alone = clf({"input_ids": short, "attention_mask": torch.ones_like(short)})
        other_alone = clf({"input_ids": other, "attention_mask": torch.ones_like(other)})
        batch = clf({"input_ids": ids, "attention_mask": mask})
        unmasked_pool = clf.head.fc(Tokens(clf.tokens({"input_ids": ids, "attention_mask": mask}).x).pool(pool))
    return alone, other_alone, batch, unmasked_pool


def test_last_on_right_padded_llama_equals_unpadded():
    alone, other_alone, batch, unmasked = _padded_vs_alone("tiny-llama", "last")
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1], other_alone[0], atol=1e-5, rtol=1e-5)
    assert (unmasked[0] - alone[0]).abs().max() > 1e-2  # reading the pad token changes the logits


def test_last_and_mean_on_right_padded_bert_equal_unpadded():
    for pool in ("last", "mean", "patch_mean"):
        alone, other_alone, batch, unmasked = _padded_vs_alone("tiny-bert", pool)
        torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch[1], other_alone[0], atol=1e-5, rtol=1e-5)
        assert (unmasked[0] - alone[0]).abs().max() > 1e-2, pool


def test_attentive_head_ignores_padding():
    """The attentive probe's queries must not attend to pad tokens: padded == unpadded logits."""
    from shared.heads import AttentiveHead, Tokens

    torch.manual_seed(0)
    head = AttentiveHead(16, 3, num_heads=4).eval()
    x = torch.randn(1, 5, 16)
    padded = torch.cat([x, torch.randn(1, 3, 16) * 10], dim=1)  # 3 loud pad tokens
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        want = head(Tokens(x, 0, None))
        got = head(Tokens(padded, 0, None, mask))
        unmasked = head(Tokens(padded, 0, None))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (unmasked - want).abs().max() > 1e-3
