import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.heads import (
    HEADS,
    AttentiveHead,
    KNNClassifier,
    LinearHead,
    PrototypicalHead,
    Tokens,
    asymmetric_loss,
    build_head,
    pooled_dim,
)


# ---------------------------------------------------------------- Tokens


def _toy_tokens():
    # B=1, 1 CLS + 2x2 patches, D=2; token i = [i, 10 i]
    x = torch.tensor([[[i, 10.0 * i] for i in range(5)]])  # (1, 5, 2)
    return Tokens(x, num_prefix=1, grid=(2, 2))


def test_pool_values():
    t = _toy_tokens()
    torch.testing.assert_close(t.pool("cls"), torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(t.pool("mean"), torch.tensor([[2.0, 20.0]]))  # (0+1+2+3+4)/5
    torch.testing.assert_close(t.pool("patch_mean"), torch.tensor([[2.5, 25.0]]))  # (1+2+3+4)/4
    torch.testing.assert_close(t.pool("cls+patch_mean"), torch.tensor([[0.0, 0.0, 2.5, 25.0]]))
    torch.testing.assert_close(t.pool("last"), torch.tensor([[4.0, 40.0]]))
    assert pooled_dim(7, "cls+patch_mean") == 14 and pooled_dim(7, "mean") == 7


def test_pool_errors():
    t = _toy_tokens()
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        t.pool("max")
    with pytest.raises(ValueError, match="CLS"):
        Tokens(t.x, 0, None).pool("cls")
    with pytest.raises(ValueError, match="unknown pooling"):
        pooled_dim(4, "nope")


def test_patch_map_ordering_and_errors():
    b, p, h, w, d = 2, 2, 3, 4, 5
    x = torch.randn(b, p + h * w, d)
    fmap = Tokens(x, p, (h, w)).patch_map()
    assert fmap.shape == (b, d, h, w)
    for i in range(h):
        for j in range(w):
            torch.testing.assert_close(fmap[:, :, i, j], x[:, p + i * w + j])
    with pytest.raises(ValueError, match="grid is None"):
        Tokens(x, p, None).patch_map()
    with pytest.raises(ValueError, match="grid 3x3 needs 9"):
        Tokens(x, p, (3, 3)).patch_map()


# ---------------------------------------------------------------- simple heads


def test_linear_head_value():
    t = _toy_tokens()
    head = LinearHead(2, 1, pool="patch_mean")
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.1]]))
        head.fc.bias.fill_(0.5)
    torch.testing.assert_close(head(t), torch.tensor([[2.5 + 2.5 + 0.5]]))
    fresh = LinearHead(8, 3)
    assert torch.all(fresh.fc.bias == 0) and fresh.fc.weight.std() < 0.03


def test_attentive_head_single_token_and_heads_fallback():
    # With one key/value token the attention weights are 1, so the output ignores the query.
    head = AttentiveHead(12, 3, num_heads=8)
    assert head.num_heads == 4 and head.config()["num_heads"] == 4  # gcd(12, 8)
    x = torch.randn(2, 1, 12)
    a = head.attn
    v = x @ a.in_proj_weight[24:].T + a.in_proj_bias[24:]
    z = v @ a.out_proj.weight.T + a.out_proj.bias
    expected = head.fc(head.norm(z[:, 0]))
    torch.testing.assert_close(head(Tokens(x, 0, None)), expected)


# ---------------------------------------------------------------- prototypical head


def _set_protos(head, protos, weight=None):
    with torch.no_grad():
        head.prototypes.copy_(protos)
        if weight is not None:
            head.weight.copy_(weight)


def test_prototypical_exact_match_logit_and_nonnegativity():
    c, p, d = 3, 4, 6
    torch.manual_seed(0)
    x = torch.rand(2, 1 + 2 * 3, d) + 0.1  # all-positive tokens, CLS + 2x3 patches
    tokens = Tokens(x, 1, (2, 3))
    head = PrototypicalHead(d, c, prototypes_per_class=p, focal=False, upsample=1)
    target = x[0, 1 + 4]  # sample 0, patch (1, 1)
    protos = -torch.rand(c * p, d) - 0.1  # negative: cosine < 0 with every patch -> ReLU -> 0
    protos[:p] = 5.0 * target  # class 0's prototypes all point at the target patch (scale is irrelevant)
    weight = torch.full((c, p), 0.5)
    weight[0, 0] = -3.0  # negative weights must contribute nothing
    _set_protos(head, protos, weight)
    logits = head(tokens)
    # class 0 of sample 0: cosine 1 for prototypes 1..3 (prototype 0 has a clamped weight), divided by
    # Bird-MAE's 1.01 -> 3 * 0.5 / 1.01 - 2 (the definition changed on purpose: it was 3 * 0.5 - 2)
    assert logits[0, 0].item() == pytest.approx(3 * 0.5 / 1.01 - 2.0, abs=1e-5)
    torch.testing.assert_close(logits[:, 1:], torch.full((2, c - 1), -2.0))  # bias only
    sim = head.similarities(tokens)
    torch.testing.assert_close(sim[0, 0], torch.full((p,), 1 / 1.01))
    plain = PrototypicalHead(d, c, prototypes_per_class=p, focal=False, upsample=1, cosine_scale=1.0)
    plain.load_state_dict(head.state_dict())
    assert plain(tokens)[0, 0].item() == pytest.approx(3 * 0.5 - 2.0, abs=1e-5)  # the former plain cosine


def test_prototypical_focal_and_upsample_match_brute_force():
    torch.manual_seed(1)
    c, p, d, h, w = 2, 3, 5, 2, 3
    x = torch.randn(2, 1 + h * w, d)
    head = PrototypicalHead(d, c, prototypes_per_class=p, focal=True, upsample=2)
    _set_protos(head, torch.randn(c * p, d), torch.rand(c, p) + 0.1)
    # brute force: subtract CLS per patch, build map, upsample, loop over prototypes and locations
    fmap = (x[:, 1:] - x[:, :1]).transpose(1, 2).reshape(2, d, h, w)
    fmap = F.interpolate(fmap, scale_factor=2, mode="bilinear", align_corners=False)
    expected = torch.empty(2, c)
    for b in range(2):
        for k in range(c):
            s = 0.0
            for j in range(p):
                proto = head.prototypes[k * p + j].detach()
                locs = fmap[b].flatten(1).T  # (4HW, D), every upsampled location
                cos = [F.cosine_similarity(v, proto, dim=0) / 1.01 for v in locs]  # Bird-MAE's scale
                s += max(max(cos).item(), 0.0) * head.weight[k, j].item()
            expected[b, k] = s + head.bias[k].item()
    torch.testing.assert_close(head(Tokens(x, 1, (h, w))), expected, atol=1e-5, rtol=1e-5)
    # focal subtraction changes the answer whenever CLS is non-zero
    no_focal = PrototypicalHead(d, c, prototypes_per_class=p, focal=False, upsample=2)
    no_focal.load_state_dict(head.state_dict())
    assert not torch.allclose(no_focal(Tokens(x, 1, (h, w))), expected, atol=1e-3)


def test_orthogonality_loss():
    d, p = 6, 4
    head = PrototypicalHead(d, 2, prototypes_per_class=p)
    protos = torch.cat([3.0 * torch.eye(d)[:p], torch.eye(d)[2:]])  # orthogonal rows per class, any scale
    _set_protos(head, protos)
    assert head.orthogonality_loss().item() == pytest.approx(0.0, abs=1e-6)
    # two identical prototypes per class: Gram - I = [[0,1],[1,0]] -> ||.||_F = sqrt(2), / 2^2
    head2 = PrototypicalHead(3, 1, prototypes_per_class=2)
    _set_protos(head2, torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]))
    assert head2.orthogonality_loss().item() == pytest.approx(math.sqrt(2) / 4, abs=1e-6)
    # Bird-MAE: one Frobenius norm over all classes, / C*P*P. Two classes like head2:
    # sqrt(2 + 2) / (2 * 2 * 2) = 0.25 (a per-class mean would give sqrt(2) / 4 = 0.354, sqrt(C) times more)
    head3 = PrototypicalHead(3, 2, prototypes_per_class=2)
    _set_protos(head3, torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 0.0], [0.0, 5.0, 0.0]]))
    assert head3.orthogonality_loss().item() == pytest.approx(0.25, abs=1e-6)


def test_prototypical_gradients():
    torch.manual_seed(2)
    head = PrototypicalHead(8, 3, prototypes_per_class=2)
    x = torch.rand(4, 1 + 4, 8)
    loss = asymmetric_loss(head(Tokens(x, 1, (2, 2))), torch.randint(0, 2, (4, 3))) + head.orthogonality_loss()
    loss.backward()
    assert head.prototypes.grad.abs().sum() > 0
    assert head.weight.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0
    assert torch.all(PrototypicalHead(4, 2).weight == 1.0) and torch.all(PrototypicalHead(4, 2).bias == -2.0)


# ---------------------------------------------------------------- build_head round trip


@pytest.mark.parametrize(
    "head",
    [
        LinearHead(8, 3, pool="cls+patch_mean", norm=True, dropout=0.1),
        AttentiveHead(8, 3, num_heads=2, num_queries=3),
        PrototypicalHead(8, 3, prototypes_per_class=2, focal=True, upsample=2),
    ],
    ids=lambda h: h.kind,
)
def test_build_head_round_trip(head):
    cfg = json.loads(json.dumps(head.config()))
    assert cfg["kind"] in HEADS
    rebuilt = build_head(cfg)
    rebuilt.load_state_dict(head.state_dict())
    head.eval(), rebuilt.eval()
    tokens = Tokens(torch.randn(2, 1 + 6, 8), 1, (2, 3))
    torch.testing.assert_close(rebuilt(tokens), head(tokens))
    assert rebuilt.config() == head.config()


def test_build_head_unknown_kind():
    with pytest.raises(ValueError, match="'mlp'"):
        build_head({"kind": "mlp", "dim": 4})


# ---------------------------------------------------------------- kNN


def _knn_reference(train, labels, queries, k, t, c):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = np.zeros((len(queries), c))
    for i, q in enumerate(queries):
        sims = train @ q
        idx = np.argsort(-sims)[:k]
        for j in idx:
            out[i, labels[j]] += np.exp(sims[j] / t)
        out[i] /= out[i].sum()
    return out


def test_knn_matches_numpy_reference_and_multi_k():
    rng = np.random.default_rng(0)
    train, labels = rng.normal(size=(60, 5)), rng.integers(0, 4, 60)
    queries = rng.normal(size=(9, 5))
    knn = KNNClassifier(k=7, temperature=0.07).fit(train, labels)
    for k in (1, 7, 20):
        ref = _knn_reference(train, labels, queries, k, 0.07, 4)
        np.testing.assert_allclose(knn.predict_proba(queries, k=k).numpy(), ref, atol=1e-5)
    multi = knn.predict_proba(queries, k=[1, 7, 20], chunk_size=4)
    for k in (1, 7, 20):
        torch.testing.assert_close(multi[k], knn.predict_proba(queries, k=k))
    torch.testing.assert_close(knn.predict_proba(queries), multi[7])  # default k
    assert torch.equal(knn.predict(queries), multi[7].argmax(1))


def test_knn_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(1)
    train, labels = rng.normal(size=(30, 4)).astype(np.float32), rng.integers(0, 3, 30)
    queries = rng.normal(size=(5, 4))
    a = KNNClassifier(k=5).fit(train, labels).predict_proba(queries)
    b = KNNClassifier(k=5).fit(torch.from_numpy(train), torch.from_numpy(labels))
    b = b.predict_proba(torch.from_numpy(queries))
    assert torch.equal(a, b)


def test_knn_uniform_weights_match_sklearn_majority_vote():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(2)
    # two overlapping clusters so that neighbourhoods are mixed; odd k -> no vote ties
    train = np.concatenate([rng.normal(loc=[1, 0, 0], size=(40, 3)), rng.normal(loc=[0, 1, 0], size=(40, 3))])
    labels = np.repeat([0, 1], 40)
    queries = rng.normal(loc=[0.5, 0.5, 0], size=(25, 3))
    ours = KNNClassifier(k=7, temperature=1e6).fit(train, labels)
    sk = KNeighborsClassifier(n_neighbors=7, metric="cosine").fit(train, labels)
    np.testing.assert_allclose(ours.predict_proba(queries).numpy(), sk.predict_proba(queries), atol=1e-4)
    np.testing.assert_array_equal(ours.predict(queries).numpy(), sk.predict(queries))
    assert 0 < sk.predict(queries).sum() < 25  # the case is not trivially one-sided


def test_knn_errors_and_k_clipping():
    knn = KNNClassifier(k=3)
    with pytest.raises(ValueError, match="before fit"):
        knn.predict_proba(np.ones((1, 2)))
    knn.fit(np.eye(3), [0, 1, 2])
    with pytest.raises(ValueError, match=r"queries must be \(Q, 3\)"):
        knn.predict_proba(np.ones((1, 2)))
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn.predict_proba(np.ones((1, 3)), k=0)
    q = np.array([[1.0, 0.2, 0.0]])
    torch.testing.assert_close(knn.predict_proba(q, k=50), knn.predict_proba(q, k=3))  # k clipped to N


# ---------------------------------------------------------------- asymmetric loss


def test_asl_reduces_to_bce_without_focusing_or_clip():
    torch.manual_seed(3)
    logits, targets = 3 * torch.randn(4, 6), torch.randint(0, 2, (4, 6)).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    plain = dict(gamma_neg=0, gamma_pos=0, clip=0)
    torch.testing.assert_close(asymmetric_loss(logits, targets, **plain), bce.mean())  # Bird-MAE: mean of all
    torch.testing.assert_close(asymmetric_loss(logits, targets, reduction="batchmean", **plain), bce.sum(1).mean())
    torch.testing.assert_close(asymmetric_loss(logits, targets, reduction="sum", **plain), bce.sum())


def test_asl_hand_values_and_clip():
    # easy negatives (p = sigmoid(-4) ~ 0.018 < 0.05) are discarded entirely
    assert asymmetric_loss(torch.full((2, 3), -4.0), torch.zeros(2, 3)).item() == 0.0
    # p = 0.5: positive -> -(1 - 0.5)^1 log 0.5; negative -> -(0.5 - 0.05)^4 log(1 - 0.45)
    pos, neg = -(0.5 * math.log(0.5)), -(0.45**4 * math.log(0.55))  # 0.34657, 0.02459
    # Bird-MAE's reduction="mean": over all 2 elements (the definition changed on purpose: this
    # function returned the per-sample class sum, 0.37116, before)
    loss = asymmetric_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx((pos + neg) / 2, rel=1e-6)
    two = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert asymmetric_loss(torch.zeros(2, 2), two).item() == pytest.approx((pos + neg) / 2, rel=1e-6)
    # "batchmean" (the former convention): summed over the classes, averaged over the batch = C x mean
    assert asymmetric_loss(torch.zeros(2, 2), two, reduction="batchmean").item() == pytest.approx(pos + neg, rel=1e-6)
    assert asymmetric_loss(torch.zeros(2, 2), two, reduction="sum").item() == pytest.approx(2 * (pos + neg), rel=1e-6)
    with pytest.raises(ValueError, match="reduction must be one of"):
        asymmetric_loss(torch.zeros(1, 2), two[:1], reduction="none")


def test_asl_mean_is_one_c_th_of_batchmean():
    """The reference reduction averages over B x C elements: exactly C times smaller than the former
    per-sample class sum, so the orthogonality loss weighs C times more and clipping at 2 bites later."""
    torch.manual_seed(4)
    logits, targets = torch.randn(8, 21), torch.randint(0, 2, (8, 21))
    mean, batchmean = asymmetric_loss(logits, targets), asymmetric_loss(logits, targets, reduction="batchmean")
    assert batchmean.item() == pytest.approx(21 * mean.item(), rel=1e-6)


# ---------------------------------------------------------------- prototypical layouts


def test_birdmae_reshape_lays_four_time_steps_of_eight_mel_patches_per_row():
    """Bird-MAE reshapes the time-major (32 x 8) patch sequence to (8, 32): row 0 holds time steps
    0-3 with their 8 mel patches each, so its column 8 is (time 1, mel 0), not (time 0, mel 1)."""
    d, t, f = 2, 32, 8
    idx = torch.arange(t * f, dtype=torch.float32)
    x = torch.stack([idx // f, idx % f], -1)[None]  # token (time, mel) coordinates as features
    grid = PrototypicalHead(d, 1, 1, focal=False, upsample=1).feature_map(Tokens(x, 0, (t, f)))
    ref = PrototypicalHead(d, 1, 1, focal=False, upsample=1, patch_layout="birdmae_reshape").feature_map(
        Tokens(x, 0, (t, f)))
    assert grid.shape == (1, d, 32, 8) and ref.shape == (1, d, 8, 32)
    assert grid[0, :, 1, 0].tolist() == [1.0, 0.0] and grid[0, :, 0, 1].tolist() == [0.0, 1.0]
    assert ref[0, :, 0, 8].tolist() == [1.0, 0.0]  # (time 1, mel 0) sits right of (time 0, mel 7)
    assert ref[0, :, 0, 7].tolist() == [0.0, 7.0] and ref[0, :, 1, 0].tolist() == [4.0, 0.0]
    # without upsampling the global max pool cannot tell the layouts apart; with it, they differ
    torch.manual_seed(5)
    tok = Tokens(torch.randn(2, 1 + t * f, 16), 1, (t, f))
    a, b = PrototypicalHead(16, 3, 4, upsample=1), PrototypicalHead(16, 3, 4, upsample=1, patch_layout="birdmae_reshape")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(tok), b(tok))
    a2, b2 = PrototypicalHead(16, 3, 4), PrototypicalHead(16, 3, 4, patch_layout="birdmae_reshape")
    a2.load_state_dict(a.state_dict()), b2.load_state_dict(a.state_dict())
    assert not torch.allclose(a2(tok), b2(tok), atol=1e-4)
    with pytest.raises(ValueError, match="patch_layout must be one of"):
        PrototypicalHead(16, 3, 4, patch_layout="transpose")


def test_a_prototypical_config_saved_before_the_cosine_scale_keeps_the_plain_cosine():
    new = PrototypicalHead(8, 2, prototypes_per_class=2)
    assert new.config()["cosine_scale"] == 1.01 and new.config()["patch_layout"] == "grid"
    old = {k: v for k, v in new.config().items() if k not in ("cosine_scale", "patch_layout")}
    rebuilt = build_head(old)  # a bundle written before these fields existed
    assert rebuilt.cosine_scale == 1.0 and rebuilt.patch_layout == "grid"
