"""FLOPs of one training step, as torch counts them: nnU-Net's worker counts its planned network with this, and the
benchmark (:mod:`medseg.benchmark.compute`) counts every other arm with it, so that the numbers compare.

:class:`torch.utils.flop_counter.FlopCounterMode` around the model's forward on one batch and the backward of a scalar
of its outputs (every output of a deep-supervision network). With the model and batch on the ``meta`` device no
arithmetic runs, so a large network at its training batch is counted in about a second on a CPU. The counter sees
matrix products and convolutions (``2 * m * n * k`` per product, forward and backward), not element-wise work (norms,
activations, the loss): the usual convention of training-FLOP estimates. Frozen parameters get no weight gradient,
so their layers' backward costs only the input gradient, as in a real step.

Here rather than in the benchmark package because the worker, which runs in nnU-Net's process, sits below it. It does
not import ``nnunetv2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["step_flops"]


def _scalars(output: Any) -> list[torch.Tensor]:
    """The sum of every floating tensor in ``output`` (a tensor, or lists/tuples/dicts of them)."""
    if isinstance(output, torch.Tensor):
        return [output.float().sum()] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [s for item in output for s in _scalars(item)]
    return []


def step_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of one training step of ``model`` on ``inputs``: its forward, then the backward of its outputs' sum.

    The model is put in training mode (dropout and batch statistics as in training) and left there. Runs wherever the
    model and inputs are (``meta`` for a count without arithmetic).

    Raises:
        ValueError: the model's output holds no floating tensor to differentiate.
    """
    model.train()
    with FlopCounterMode(display=False) as counter:
        scalars = _scalars(model(inputs))
        if not scalars:
            raise ValueError(
                f"{type(model).__name__}'s output holds no floating tensor; there is no backward to count."
            )
        loss = torch.stack(scalars).sum()
        if loss.requires_grad:
            loss.backward()
    return int(counter.get_total_flops())
