"""``adaptformer``: a bottleneck MLP in parallel with each block's MLP (Chen et al. 2022, "AdaptFormer").

For every transformer block, ``mlp(x)`` becomes ``mlp(x) + scale * up(act(down(x)))`` with the same input ``x`` as
the MLP (after ``norm2`` on SAM and timm ViTs; the raw token stream on TinyViT, whose ``Mlp`` holds its own norm).
``up`` is zero-initialised, so the model equals the base model at initialisation. The adapter is a child module
``adaptformer`` of the block and is added by a forward hook on ``block.mlp``: the base parameter names, and so the
base checkpoint layout, do not change.

Applies to SAM ViTs, DINOv2/MAE ViTs, and the attention stages of LiteMedSAM's TinyViT (its first, convolutional
stage has no token MLP).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.adapters.blocks import block_sites
from medseg.errors import ConfigError

__all__ = ["AdaptFormer", "apply_adaptformer"]


class AdaptFormer(nn.Module):
    """``scale * up(dropout(relu(down(x))))`` on the last dimension, with ``up`` zero-initialised.

    Args:
        dim: channels of the block.
        bottleneck: hidden width of the adapter.
        scale: fixed multiplier of the adapter output (AdaptFormer uses 0.1 for ViT-B), or the initial value of a
            learned scalar when ``learn_scale`` is set.
        dropout: dropout probability after the activation.
    """

    def __init__(
        self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.0, learn_scale: bool = False
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class _ParallelHook:
    """Forward hook on ``block.mlp``: adds the adapter's output on the MLP's input."""

    def __init__(self, adapter: AdaptFormer) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.adapter(args[0])


def apply_adaptformer(
    model: nn.Module,
    bottleneck: int = 64,
    scale: float = 0.1,
    dropout: float = 0.0,
    learn_scale: bool = False,
    blocks: Sequence[int] | None = None,
    last_k_blocks: int | None = None,
) -> list[str]:
    """Add a parallel AdaptFormer adapter to the MLP of each transformer block (or of ``blocks``, or the last
    ``last_k_blocks``).

    Returns:
        The names of the parameters made trainable.
    """
    names = []
    for site in block_sites(model, blocks, last_k_blocks, "adaptformer"):
        mlp = getattr(site.block, "mlp", None)
        if mlp is None:
            raise ConfigError(f"adaptformer: block {site.name} has no 'mlp' module to run in parallel with.")
        param = next(site.block.parameters())
        adapter = AdaptFormer(site.dim, bottleneck, scale, dropout, learn_scale).to(param.device, param.dtype)
        site.block.add_module("adaptformer", adapter)
        mlp.register_forward_hook(_ParallelHook(adapter))
        names += [f"{site.name}.adaptformer.{n}" for n, _ in adapter.named_parameters()]
    return names
