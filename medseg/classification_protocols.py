"""The evaluation ladder of foundation models: kNN and linear probe on frozen, cached features; PEFT; full tuning.

``protocol=knn|linear|peft|full`` (``conf/protocol``) picks the rung:

* ``knn``: the backbone is frozen; every training case's embedding is cached once (:mod:`medseg.tasks.feature_cache`)
  and a test case's probabilities are the votes of its ``k`` nearest training cases by cosine similarity, uniform or
  weighted by ``exp(similarity / temperature)`` as in DINO/DINOv2's kNN evaluation (:class:`KNNHead`);
* ``linear``: the same cached features; a linear layer (softmax or sigmoid) is fitted full-batch with L-BFGS on
  standardised features, its L2 penalty chosen on the validation cases from a small grid (:func:`fit_linear_probe`),
  and folded back into a plain ``nn.Linear`` so the model is an ordinary classifier afterwards;
* ``peft``: the backbone with an adapter (``adapter=lora|ssf|...``) and the head train by gradient descent
  (:class:`medseg.tasks.classification.ClassificationTask`);
* ``full``: every parameter trains, with layer-wise learning-rate decay.

Label fractions come from the data module (``data.label_fraction``), nested as in segmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError

__all__ = ["FROZEN_PROTOCOLS", "PROTOCOLS", "KNNHead", "fit_knn", "fit_linear_probe", "one_hot_targets"]

PROTOCOLS = ("knn", "linear", "peft", "full")
FROZEN_PROTOCOLS = ("knn", "linear")


def one_hot_targets(targets: Any, num_outputs: int, kind: str) -> torch.Tensor:
    """``(N, K)`` float targets: one-hot class indices, or the 0/1 matrix of multi-label targets as given."""
    targets = torch.as_tensor(np.asarray(targets))
    if kind == "multilabel":
        return targets.float()
    return F.one_hot(targets.long().reshape(-1), num_outputs).float()


class KNNHead(nn.Module):
    """Cosine k-nearest-neighbour vote over a bank of training embeddings; outputs probabilities ``(B, K)``.

    Args:
        bank: ``(N, E)`` training embeddings (L2-normalised here).
        targets: ``(N, K)`` one-hot (or multi-label 0/1) training targets.
        k: neighbours (at most ``N``).
        weights: ``uniform`` (the fraction of neighbours of each class, as scikit-learn's
            ``KNeighborsClassifier(metric="cosine")``) or ``similarity`` (votes ``exp(cos / temperature)``, DINO).
        temperature: of ``similarity`` votes.

    The bank is a buffer, so it is saved with the model; a state dict of another bank size loads too.
    """

    outputs_probabilities = True

    def __init__(
        self, bank: torch.Tensor, targets: torch.Tensor, k: int = 20, weights: str = "similarity", temperature=0.07
    ) -> None:
        super().__init__()
        if weights not in ("uniform", "similarity"):
            raise ConfigError(f"protocol.weights must be 'uniform' or 'similarity', got {weights!r}.")
        if k < 1:
            raise ConfigError(f"protocol.k must be at least 1, got {k}.")
        self.register_buffer("bank", F.normalize(bank.float(), dim=1))
        self.register_buffer("targets", targets.float())
        self.k, self.weights, self.temperature = int(k), weights, float(temperature)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        similarity = F.normalize(embedding.float(), dim=1) @ self.bank.T  # (B, N)
        top, index = similarity.topk(min(self.k, self.bank.shape[0]), dim=1)
        votes = torch.ones_like(top) if self.weights == "uniform" else (top / self.temperature).exp()
        probs = torch.einsum("bk,bkc->bc", votes, self.targets[index]) / votes.sum(dim=1, keepdim=True)
        return probs.clamp(0.0, 1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("bank", "targets"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def fit_knn(
    features: torch.Tensor,
    targets: Any,
    num_outputs: int,
    kind: str,
    k: int = 20,
    weights="similarity",
    temperature=0.07,
) -> KNNHead:
    """A :class:`KNNHead` whose bank is the training ``features`` ``(N, E)`` and their ``targets``."""
    return KNNHead(features, one_hot_targets(targets, num_outputs, kind), k, weights, temperature)


def _loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target.argmax(dim=1))


def _fit(x: torch.Tensor, y: torch.Tensor, kind: str, l2: float, max_iter: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(x.shape[1], y.shape[1]).double()
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    optimiser = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = _loss(layer(x), y, kind) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return layer


def fit_linear_probe(
    features: torch.Tensor,
    targets: Any,
    num_outputs: int,
    kind: str,
    val_features: torch.Tensor | None = None,
    val_targets: Any = None,
    l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    max_iter: int = 200,
    seed: int = 0,
) -> tuple[nn.Linear, dict[str, Any]]:
    """Fit a linear classifier on frozen features; returns it as ``nn.Linear`` on the raw features and its facts.

    Features are standardised with the training mean and standard deviation; the penalty ``l2 * ||W||^2`` is chosen
    as the grid value with the lowest validation loss (without validation cases: the grid's middle value). The
    standardisation is folded into the returned layer's weights, so it applies to unstandardised embeddings.

    Returns:
        ``(layer, {"linear_l2": chosen penalty, "linear_val_loss": its validation loss or None})``.
    """
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    y = one_hot_targets(targets, num_outputs, kind).double()
    z = (x - mean) / std
    if not l2_grid:
        raise ConfigError("protocol.l2_grid needs at least one penalty value.")
    have_val = val_features is not None and len(val_features) > 0
    best: tuple[float, float, nn.Linear] | None = None
    if have_val:
        zv = (val_features.double() - mean) / std
        yv = one_hot_targets(val_targets, num_outputs, kind).double()
        for l2 in l2_grid:
            layer = _fit(z, y, kind, float(l2), max_iter, seed)
            with torch.no_grad():
                loss = float(_loss(layer(zv), yv, kind))
            if best is None or loss < best[0]:
                best = (loss, float(l2), layer)
    else:
        l2 = float(sorted(l2_grid)[len(l2_grid) // 2])
        best = (float("nan"), l2, _fit(z, y, kind, l2, max_iter, seed))
    loss, l2, layer = best
    folded = nn.Linear(x.shape[1], num_outputs)
    with torch.no_grad():
        weight = layer.weight / std  # W z + b = (W / s) x + (b - (W / s) m)
        folded.weight.copy_(weight.float())
        folded.bias.copy_((layer.bias - weight @ mean).float())
    return folded, {"linear_l2": l2, "linear_val_loss": loss if have_val else None}
