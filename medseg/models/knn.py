"""The kNN head of a classifier: a cosine vote over the training cases' embeddings, kept in the model itself.

The ``knn`` rung of the protocol ladder (:mod:`medseg.workflows.classification.protocols`) replaces a
:class:`~medseg.models.classifier.Classifier`'s linear head by a :class:`KNNHead`. The bank of training embeddings
is a buffer, so the head is saved with the model's weights and a ``medseg classify`` run folder reloads into the
same classifier (:func:`medseg.inference.classified.load_classifier`) with nothing refitted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError

__all__ = ["KNNHead"]


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

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("bank", "targets"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
