"""Turning a backbone's token map into one vector per image, and slice vectors into one per volume.

* ``cls``: the backbone's class token (DINOv2, MAE); SAM and LiteMedSAM have none.
* ``mean``: the mean of the final feature map over its grid cells (every family), parameter-free.
* ``attention``: gated attention pooling (Ilse et al., ICML 2018): weights ``softmax(w . (tanh(V x) * sigmoid(U x)))``
  over the tokens (or slices), learned with the head.

The same :class:`AttentionPool` aggregates slice embeddings of a 3-D volume (``aggregation: attention``), and
``aggregation: mean`` averages them.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.backbones.base import BackboneOutput
from medseg.errors import ConfigError

__all__ = ["AGGREGATIONS", "POOLINGS", "AttentionPool", "SliceAggregation", "TokenPooling"]

POOLINGS = ("cls", "mean", "attention")
AGGREGATIONS = ("mean", "attention")


class AttentionPool(nn.Module):
    """Gated attention over a set: ``(B, N, D) -> (B, D)``; the weights are kept in ``last_weights`` ``(B, N)``."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.value = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1)
        self.last_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.score(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x))).squeeze(-1)
        weights = logits.softmax(dim=-1)
        self.last_weights = weights.detach()
        return torch.einsum("bn,bnd->bd", weights, x)


class TokenPooling(nn.Module):
    """``BackboneOutput -> (B, D)`` by ``cls``, ``mean`` or ``attention`` (see the module docstring)."""

    def __init__(self, mode: str, dim: int) -> None:
        super().__init__()
        if mode not in POOLINGS:
            raise ConfigError(f"model.pooling must be one of {POOLINGS}, got {mode!r}.")
        self.mode = mode
        self.attention = AttentionPool(dim) if mode == "attention" else None

    @property
    def parameter_free(self) -> bool:
        """Whether pooling has no learned part, so frozen features can be cached once."""
        return self.attention is None

    def forward(self, output: BackboneOutput) -> torch.Tensor:
        if self.mode == "cls":
            if output.cls_token is None:
                raise ConfigError(
                    "model.pooling=cls needs a backbone with a class token (dinov2_*, mae_*); SAM and LiteMedSAM "
                    "have none: use pooling=mean or pooling=attention."
                )
            return output.cls_token
        tokens = output.features.flatten(2).transpose(1, 2)  # (B, h*w, D)
        if self.attention is None:
            return tokens.mean(dim=1)
        return self.attention(tokens)


class SliceAggregation(nn.Module):
    """``(B, D_slices, E) -> (B, E)``: the mean of the slice embeddings, or attention over them."""

    def __init__(self, mode: str, dim: int) -> None:
        super().__init__()
        if mode not in AGGREGATIONS:
            raise ConfigError(f"model.aggregation must be one of {AGGREGATIONS}, got {mode!r}.")
        self.mode = mode
        self.attention = AttentionPool(dim) if mode == "attention" else None

    @property
    def parameter_free(self) -> bool:
        return self.attention is None

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        return slices.mean(dim=1) if self.attention is None else self.attention(slices)
