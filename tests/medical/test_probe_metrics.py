"""medical.probes metrics: binary tasks get AUROC; macro AUROC leaves out labels a split lacks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medical.data import MedMNISTDataModule
from medical.probes import _score, auroc, train_linear_grid


def _features(y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    signal = (y.float()[:, None] - 0.5) * 0.8
    f = lambda d: signal.expand(-1, d) + torch.randn(len(y), d, generator=g)  # noqa: E731
    return {"cls_1": f(8), "cls_4": f(16), "patch_mean": f(8), "labels": y}


def test_binary_probe_reports_auroc_on_a_breastmnist_file(tmp_path, med):
    path = med.write_medmnist(tmp_path / "breastmnist.npz", n=(60, 20, 30))
    dm = MedMNISTDataModule(path)  # 0 malignant, 1 normal/benign
    feats = {s: _features(torch.from_numpy(dm.splits[s].targets), i) for i, s in enumerate(("train", "val", "test"))}
    best, results, grid = train_linear_grid(feats, 2, epochs=3, batch_size=16)
    head = grid.heads[grid.names.index((best.feature, best.lr))]
    x = feats["test"][best.feature.split("+")[0]]
    if best.feature.endswith("+patch_mean"):
        x = torch.cat([x, feats["test"]["patch_mean"]], -1)
    with torch.no_grad():
        probs = head(x).softmax(-1)[:, 1]
    assert best.test_auroc == pytest.approx(roc_auc_score(feats["test"]["labels"], probs), abs=1e-6)
    assert all(r.test_auroc is not None for r in results)


def test_auroc_values_and_absent_classes():
    logits = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 0.5, 0.0]])
    y = torch.tensor([1, 0, 2, 1, 0])
    probs = logits.softmax(-1).numpy()
    want = np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(3)])
    assert auroc(logits, y) == pytest.approx(want)
    four = torch.cat([logits, torch.zeros(5, 1)], -1)  # a 4th class absent from this split: left out
    probs4 = four.softmax(-1).numpy()
    assert auroc(four, y) == pytest.approx(np.mean([roc_auc_score(y == c, probs4[:, c]) for c in range(3)]))
    # multi-label: a label without positives is left out; NaN (uncertain) targets are ignored
    ml = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, float("nan")], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = torch.tensor([[2.0, -1.0, 0.3], [-1.0, 1.0, 0.1], [1.0, 0.5, -2.0], [-2.0, 0.2, 0.0]])
    want = np.mean([roc_auc_score(ml[:, j], out[:, j].sigmoid()) for j in range(2)])
    assert _score(out, ml, multilabel=True) == pytest.approx(want)


def test_knn_auroc_equals_sklearn_on_its_probabilities():
    from sklearn.metrics import roc_auc_score

    from medical.probes import knn_auroc
    from shared.heads import KNNClassifier

    g = torch.Generator().manual_seed(0)
    train = {"cls_1": torch.randn(40, 8, generator=g), "labels": torch.arange(40) % 2}
    train["cls_1"][train["labels"] == 1] += 1.0
    test = {"cls_1": torch.randn(20, 8, generator=g), "labels": torch.arange(20) % 2}
    test["cls_1"][test["labels"] == 1] += 1.0
    knn = KNNClassifier(temperature=0.07, num_classes=2).fit(train["cls_1"], train["labels"])
    p1 = knn.predict_proba(test["cls_1"], k=5)[:, 1]
    want = roc_auc_score(test["labels"].numpy(), p1.numpy())
    assert knn_auroc(train, test, 5) == pytest.approx(want, abs=1e-6)
    assert 0.5 < want <= 1.0

