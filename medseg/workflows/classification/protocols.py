"""The evaluation ladder of foundation models: kNN and linear probe on frozen, cached features; PEFT; full tuning.

``protocol=knn|linear|peft|full`` (``conf/protocol``) picks the rung:

* ``knn``: the backbone is frozen; every training case's embedding is cached once (:mod:`.features`) and a test
  case's probabilities are the votes of its ``k`` nearest training cases by cosine similarity, uniform or weighted by
  ``exp(similarity / temperature)`` as in DINO/DINOv2's kNN evaluation (:class:`~medseg.models.knn.KNNHead`, a part
  of the model, so the run folder reloads without refitting);
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
from medseg.models.knn import KNNHead

__all__ = ["FROZEN_PROTOCOLS", "PROTOCOLS", "fit_knn", "fit_linear_probe", "one_hot_targets"]

PROTOCOLS = ("knn", "linear", "peft", "full")
FROZEN_PROTOCOLS = ("knn", "linear")


def one_hot_targets(targets: Any, num_outputs: int, kind: str) -> torch.Tensor:
    """``(N, K)`` float targets: one-hot class indices, or the 0/1 matrix of multi-label targets as given."""
    targets = torch.as_tensor(np.asarray(targets))
    if kind == "multilabel":
        return targets.float()
    return F.one_hot(targets.long().reshape(-1), num_outputs).float()


def fit_knn(
    features: torch.Tensor,
    targets: Any,
    num_outputs: int,
    kind: str,
    k: int = 20,
    weights: str = "similarity",
    temperature: float = 0.07,
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
