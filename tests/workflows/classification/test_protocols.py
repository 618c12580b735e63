"""kNN and linear-probe heads: the kNN vote equals scikit-learn's; the linear probe separates what is separable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from medseg.models.knn import KNNHead
from medseg.workflows.classification.protocols import fit_knn, fit_linear_probe


def _blobs(n: int, seed: int, classes: int = 3, dim: int = 16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(classes, dim))
    labels = rng.integers(0, classes, size=n)
    return torch.tensor(centres[labels] + rng.normal(size=(n, dim)), dtype=torch.float32), labels


def test_uniform_knn_equals_sklearn_cosine_knn():
    x, y = _blobs(80, 0)
    q, _ = _blobs(30, 1)
    head = fit_knn(x, y, 3, "multiclass", k=7, weights="uniform")
    reference = KNeighborsClassifier(n_neighbors=7, metric="cosine").fit(x.numpy(), y).predict_proba(q.numpy())
    np.testing.assert_allclose(head(q).numpy(), reference, atol=1e-6)


def test_similarity_weighted_knn_favours_the_closest_neighbour():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    head = KNNHead(bank, torch.eye(2)[[0, 1, 1]], k=3, weights="similarity", temperature=0.05)
    probs = head(torch.tensor([[1.0, 0.1]]))
    assert probs[0, 0] > 0.99  # uniform votes would give class 1 two thirds
    assert KNNHead(bank, torch.eye(2)[[0, 1, 1]], k=3, weights="uniform")(torch.tensor([[1.0, 0.1]]))[0, 1] == 2 / 3


def test_knn_head_state_dict_loads_into_another_bank_size():
    x, y = _blobs(20, 2)
    saved = fit_knn(x, y, 3, "multiclass", k=5).state_dict()
    other = fit_knn(x[:4], y[:4], 3, "multiclass", k=5)
    other.load_state_dict(saved)
    assert torch.equal(other.bank, saved["bank"]) and other.targets.shape == (20, 3)


def test_multilabel_knn_gives_per_label_fractions():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    head = fit_knn(bank, np.array([[1, 0], [1, 1], [0, 1]]), 2, "multilabel", k=2, weights="uniform")
    np.testing.assert_allclose(head(torch.tensor([[1.0, 0.0]])).numpy(), [[1.0, 0.5]])


def test_linear_probe_separates_blobs_and_picks_a_penalty_on_validation():
    x, y = _blobs(120, 3)
    xv, yv = _blobs(40, 3)  # same seed: same centres
    layer, facts = fit_linear_probe(x * 50 + 7, y, 3, "multiclass", xv * 50 + 7, yv, l2_grid=[1e-4, 1.0])
    accuracy = (layer(xv * 50 + 7).argmax(1).numpy() == yv).mean()
    assert accuracy > 0.9  # standardisation is folded into the layer: it works on the raw (scaled, shifted) features
    assert facts["linear_l2"] == 1e-4 and facts["linear_val_loss"] < 0.5


def test_linear_probe_without_validation_uses_the_middle_penalty():
    x, y = _blobs(40, 4, classes=2)
    _, facts = fit_linear_probe(x, y, 2, "binary", l2_grid=[1e-3, 1e-2, 1e-1])
    assert facts == {"linear_l2": pytest.approx(1e-2), "linear_val_loss": None}
