import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.data import (
    FeatureCache,
    dataset_digest,
    extract_features,
    few_shot_indices,
    split_by_group,
)

# ------------------------------------------------------------------ few_shot_indices


def test_few_shot_single_label_exact_counts_and_sorted():
    labels = np.repeat(np.arange(4), [10, 7, 5, 12])
    idx = few_shot_indices(labels, k=3, seed=1)
    assert np.array_equal(idx, np.sort(idx))
    assert len(np.unique(idx)) == 12
    assert np.bincount(labels[idx], minlength=4).tolist() == [3, 3, 3, 3]


def test_few_shot_deterministic_and_seed_dependent():
    labels = np.repeat(np.arange(3), 50)
    a = few_shot_indices(labels, k=5, seed=7)
    b = few_shot_indices(labels, k=5, seed=7)
    c = few_shot_indices(labels, k=5, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_few_shot_multi_label_positives():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 5)) < 0.2).astype(int)
    labels[:3, 4] = 1  # make sure the rarest class still has enough
    k = 3
    idx = few_shot_indices(labels, k=k, seed=0)
    # one batch of k fresh positives per class, none shared
    assert len(idx) == k * 5
    assert (labels[idx].sum(axis=0) >= k).all()


def test_few_shot_multi_label_rarest_first():
    # class 1 has exactly k positives, all of them also positive for the common class 0;
    # visiting class 0 first could steal them, rarity order must not.
    labels = np.zeros((20, 2), dtype=int)
    labels[:, 0] = 1
    labels[:2, 1] = 1
    for seed in range(10):
        idx = few_shot_indices(labels, k=2, seed=seed)
        assert set(idx[labels[idx, 1] == 1]) == {0, 1}
        assert len(idx) == 4


def test_few_shot_groups_never_split_and_group_counts():
    # 30 patients, 3 images each, each patient has a single class
    groups = np.repeat([f"p{i:02d}" for i in range(30)], 3)
    labels = np.repeat(np.arange(30) % 3, 3)
    idx = few_shot_indices(labels, k=4, seed=0, groups=groups)
    picked_groups = np.unique(groups[idx])
    assert len(picked_groups) == 12
    # every image of a picked patient is taken, so no patient is split
    assert set(idx) == set(np.flatnonzero(np.isin(groups, picked_groups)))
    for c in range(3):
        assert len(np.unique(groups[idx][labels[idx] == c])) == 4


def test_few_shot_groups_shared_between_classes_used_once():
    # each patient has images of two classes; a patient may serve only one class
    groups = np.repeat(np.arange(10), 2)
    labels = np.tile([0, 1], 10)
    idx = few_shot_indices(labels, k=3, seed=3, groups=groups)
    g0 = set(groups[idx][labels[idx] == 0])
    g1 = set(groups[idx][labels[idx] == 1])
    assert len(g0) == 3 and len(g1) == 3 and not g0 & g1
    assert len(idx) == 6


def test_few_shot_errors_name_class_and_count():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match=r"class 'bird' has 2 samples, fewer than k=3"):
        few_shot_indices(labels, k=3, label_names=["cat", "bird", "dog"])
    with pytest.raises(ValueError, match=r"class 1 has 2 samples"):
        few_shot_indices(labels, k=3)
    # a named class with no samples at all is reported too
    with pytest.raises(ValueError, match=r"class 'fish' has 0 samples"):
        few_shot_indices(labels, k=1, label_names=["cat", "bird", "dog", "fish"])
    groups = np.array([0, 0, 1, 2, 2, 3, 4, 5])
    with pytest.raises(ValueError, match=r"class 1 has 1 groups"):
        few_shot_indices(labels, k=2, groups=groups)
    with pytest.raises(ValueError, match="k must be >= 1"):
        few_shot_indices(labels, k=0)


# ------------------------------------------------------------------ split_by_group


def test_split_by_group_disjoint_and_proportional():
    groups = np.repeat(np.arange(100), np.arange(100) % 4 + 1)
    train, val, test = split_by_group(groups, (0.8, 0.1, 0.1), seed=0)
    assert len(train) + len(val) + len(test) == len(groups)
    assert len(np.unique(np.concatenate([train, val, test]))) == len(groups)
    sets = [set(groups[s]) for s in (train, val, test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert [len(s) for s in sets] == [80, 10, 10]
    again = split_by_group(groups, (0.8, 0.1, 0.1), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    other = split_by_group(groups, (0.8, 0.1, 0.1), seed=1)
    assert not np.array_equal(train, other[0])


def test_split_by_group_validates_fractions():
    groups = np.arange(10)
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_group(groups, (0.5, 0.2))
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_group(groups, (1.2, -0.2))
    with pytest.raises(ValueError, match="too few"):
        split_by_group(np.arange(3), (0.9, 0.05, 0.05))


# ------------------------------------------------------------------ FeatureCache


def _counting_compute(calls):
    def compute():
        calls.append(1)
        return {"features": torch.arange(12.0).reshape(3, 4).t(), "labels": torch.tensor([0, 1, 2, 0])}

    return compute


def test_cache_second_call_hits(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []
    key = cache.key("vit-abc", {"size": 224}, "esc50-fold1")
    first = cache.get_or_compute(key, _counting_compute(calls))
    second = cache.get_or_compute(key, _counting_compute(calls))
    assert len(calls) == 1
    assert (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(first["features"], torch.arange(12.0).reshape(3, 4).t())
    assert first["features"].is_contiguous()
    for name in first:
        assert torch.equal(first[name], second[name])
    assert (tmp_path / f"{key}.safetensors").is_file()
    # a fresh cache object reads the same file
    other = FeatureCache(tmp_path)
    other.get_or_compute(key, _counting_compute(calls))
    assert len(calls) == 1 and other.hits == 1


def test_cache_key_changes_with_every_part():
    base = dict(fingerprint="fp", preprocessing={"sr": 16000, "n_mels": 128}, dataset="d", extractor="cls")
    k0 = FeatureCache.key(**base)
    assert len(k0) == 16 and int(k0, 16) >= 0
    # canonical: dict order does not matter
    assert FeatureCache.key(**{**base, "preprocessing": {"n_mels": 128, "sr": 16000}}) == k0
    changed = [
        {"fingerprint": "fp2"},
        {"preprocessing": {"sr": 22050, "n_mels": 128}},
        {"dataset": "d2"},
        {"dataset": {"name": "d", "split": "train"}},
        {"extractor": "mean"},
    ]
    keys = {FeatureCache.key(**{**base, **c}) for c in changed}
    assert len(keys) == len(changed) and k0 not in keys


def test_cache_corrupt_file_is_recomputed(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []
    key = cache.key("fp", {}, "d")
    cache.get_or_compute(key, _counting_compute(calls))
    path = tmp_path / f"{key}.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.warns(UserWarning, match="unreadable"):
        out = cache.get_or_compute(key, _counting_compute(calls))
    assert len(calls) == 2 and cache.misses == 2
    assert torch.equal(out["labels"], torch.tensor([0, 1, 2, 0]))
    # the rewritten file is whole again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get_or_compute(key, _counting_compute(calls))
    assert len(calls) == 2


def test_cache_atomic_no_leftovers(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.get_or_compute("good", lambda: {"x": torch.ones(2, device="cpu")})
    assert os.listdir(tmp_path) == ["good.safetensors"]

    def boom():
        raise RuntimeError("backbone exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        cache.get_or_compute("bad", boom)
    assert os.listdir(tmp_path) == ["good.safetensors"]


def test_cache_rejects_path_like_keys(tmp_path):
    with pytest.raises(ValueError):
        FeatureCache(tmp_path).get_or_compute("../evil", lambda: {})


# ------------------------------------------------------------------ extract_features


def _tiny():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).eval()
    x = torch.randn(10, 5)
    y = torch.arange(10) % 2
    return model, x, y


def test_extract_features_tuple_batches():
    model, x, y = _tiny()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    out = extract_features(model, loader)
    assert set(out) == {"features", "labels"}
    torch.testing.assert_close(out["features"], model(x).detach())
    assert torch.equal(out["labels"], y)
    # plain tensors, usable to train a probe with autograd
    assert not out["features"].is_inference()
    w = torch.zeros(3, requires_grad=True)
    (out["features"] @ w).sum().backward()
    assert FeatureCache.extract_features is extract_features


def test_extract_features_dict_batches_and_dict_outputs():
    model, x, y = _tiny()
    batches = [{"inputs": x[i : i + 3], "labels": y[i : i + 3]} for i in range(0, 10, 3)]

    def model_fn(inp):
        h = model(inp)
        return {"cls": h, "pooled": h.mean(dim=1)}

    out = extract_features(model_fn, batches)
    assert set(out) == {"cls", "pooled", "labels"}
    torch.testing.assert_close(out["cls"], model(x).detach())
    torch.testing.assert_close(out["pooled"], model(x).detach().mean(dim=1))
    assert torch.equal(out["labels"], y)


def test_extract_features_without_labels_and_errors():
    model, x, _ = _tiny()
    out = extract_features(model, [(x[:4],), (x[4:],)])
    assert set(out) == {"features"}
    with pytest.raises(ValueError, match="every batch"):
        extract_features(model, [(x[:4], torch.zeros(4)), (x[4:],)])
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, [])


# ------------------------------------------------------------------ dataset_digest


def test_dataset_digest(tmp_path):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    a.write_bytes(b"1234")
    b.write_bytes(b"xy")
    d0 = dataset_digest([a, b])
    assert len(d0) == 16
    assert dataset_digest([str(b), str(a)]) == d0  # order-free
    assert dataset_digest([a]) != d0
    a.write_bytes(b"12345")  # size change
    assert dataset_digest([a, b]) != d0
    d1 = dataset_digest([a, b])
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # mtime change
    assert dataset_digest([a, b]) != d1
    # non-file identifiers (e.g. HF dataset ids) are hashed as names
    assert dataset_digest(["ds:esc50/train"]) != dataset_digest(["ds:esc50/test"])


def test_samplers_and_pos_weight():
    import math

    from shared.data import balanced_sampler, pos_weight

    labels = np.array([0] * 90 + [1] * 10)
    draws = np.concatenate([labels[list(balanced_sampler(labels, seed=s))] for s in range(20)])
    assert abs((draws == 1).mean() - 0.5) < 0.03
    assert list(balanced_sampler(labels, seed=3)) == list(balanced_sampler(labels, seed=3))
    with pytest.raises(ValueError, match="1-D single-label"):
        balanced_sampler(np.zeros((4, 2)))
    t = np.array([[1, 0, math.nan], [0, 0, 0], [0, 1, 0], [0, 0, 1.0]])
    assert pos_weight(t) == [3.0, 3.0, 2.0]  # negatives / positives, NaN (unknown) left out
    assert pos_weight(np.zeros((3, 1))) == [1.0]  # no positive: neutral
