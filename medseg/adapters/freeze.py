"""``full`` (everything trains) and ``frozen`` (the backbone is a fixed feature extractor; only heads train).

Every method except ``full`` starts from a frozen backbone (``requires_grad=False`` on all its parameters), so
autograd computes no weight gradient for them, and no activation graph for any part of the network in front of the
first trainable tensor. ``frozen`` goes one step further: the backbone's inputs are detached in a forward pre-hook, so
even a caller that feeds inputs requiring gradients (e.g. a trainable pre-processing layer) keeps no activation graph
of the backbone; its output is a constant for the decoder. See ``tools/bench_adapters.py`` for the memory it saves.

Frozen BatchNorm layers (LiteMedSAM's convolution stages) would still update their running statistics in training
mode, so a "frozen" backbone would drift; :func:`freeze_batchnorm_statistics` keeps in evaluation mode every
BatchNorm whose weight is not trained (all of them, except under ``full``; ``bitfit`` trains their biases only and
keeps the pretrained statistics, which small medical batches would estimate badly).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medseg.adapters.blocks import late_sites

__all__ = ["apply_frozen", "apply_full", "freeze_all", "freeze_batchnorm_statistics"]


def freeze_all(model: nn.Module) -> None:
    """``requires_grad=False`` on every parameter of ``model``."""
    for param in model.parameters():
        param.requires_grad_(False)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


class _DetachInputs:
    """Forward pre-hook: the module sees detached inputs, so with frozen parameters it records no graph at all."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _detach(args), _detach(kwargs)


class _EvalBatchNorm:
    """Forward pre-hook: a frozen BatchNorm normalises with its pretrained running statistics and never updates them."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        module.train(False)


def freeze_batchnorm_statistics(model: nn.Module) -> list[str]:
    """Keep every BatchNorm whose weight is frozen in evaluation mode; returns their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not (
            module.weight is not None and module.weight.requires_grad
        ):
            if not getattr(module, "_medseg_eval_bn", False):
                module.register_forward_pre_hook(_EvalBatchNorm())
                module._medseg_eval_bn = True
            names.append(name)
    return names


def apply_full(model: nn.Module, last_k_blocks: int | None = None) -> list[str]:
    """Full fine-tuning: every backbone parameter trains. Returns the names made trainable.

    Args:
        last_k_blocks: late fine-tuning: only the last ``k`` transformer blocks and what runs after them (the neck,
            the final norm) train; the patch embedding and the blocks below stay frozen and keep no activations.
            "After" is module registration order, which is forward order in every supported family.
    """
    late = late_sites(model, last_k_blocks, "full")
    names = [name for name, _ in model.named_parameters()]
    start = 0
    if late is not None:
        first = late[0].name + "."
        start = next(i for i, name in enumerate(names) if name.startswith(first))
    for index, param in enumerate(model.parameters()):
        param.requires_grad_(index >= start)
    return names[start:]


def apply_frozen(model: nn.Module, detach_inputs: bool = True) -> list[str]:
    """Linear probe / decoder-only training: the backbone is frozen and records no activation graph.

    Args:
        detach_inputs: detach the backbone's inputs in a forward pre-hook (default). With every parameter frozen,
            this guarantees that no activation of the backbone is kept for backward, whatever the input.

    Returns:
        An empty list: no backbone parameter trains.
    """
    freeze_all(model)
    if detach_inputs and not getattr(model, "_medseg_detach_inputs", False):
        model.register_forward_pre_hook(_DetachInputs(), with_kwargs=True)
        model._medseg_detach_inputs = True
    return []
