"""``bitfit`` (train the bias terms only, Ben Zaken et al. 2022) and ``norm`` (train the LayerNorm parameters only).

Both add no parameter: they unfreeze a small, named subset of the pretrained ones, so the adapter checkpoint holds
exactly those tensors. ``bitfit`` takes every parameter called ``bias`` (linear, convolution, LayerNorm and
BatchNorm biases alike) in the targeted modules; TinyViT's ``attention_biases`` are learned relative-position tables,
not bias terms, and stay frozen. ``norm`` takes the weight and bias of LayerNorms (``nn.LayerNorm`` and the
channel-first ``LayerNorm2d`` of the SAM and TinyViT necks), not BatchNorm: with the small batches of 3-D medical
training, batch statistics are a poor target.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from medseg.adapters.blocks import late_sites
from medseg.adapters.targets import (
    TargetError,
    in_scope,
    is_adapter_name,
    iter_matching_parameters,
    module_name_summary,
)

__all__ = ["apply_bitfit", "apply_norm", "is_layer_norm"]


def is_layer_norm(module: nn.Module) -> bool:
    """``nn.LayerNorm`` or a family's own channel-first LayerNorm (``LayerNorm2d``)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__ in {"LayerNorm2d", "LayerNorm2D"}


def _scoped(model: nn.Module, targets: Sequence[str] | None, method: str, last_k_blocks: int | None) -> set[str]:
    """Names of the parameters inside the targeted modules (all of the model when ``targets`` is ``None``), within
    the last ``last_k_blocks`` blocks when set."""
    names = _targeted(model, targets, method)
    late = late_sites(model, last_k_blocks, method)
    return set(in_scope(sorted(names), late, targets or ["*"], method))


def _targeted(model: nn.Module, targets: Sequence[str] | None, method: str) -> set[str]:
    if targets is None:
        return {name for name, _ in model.named_parameters()}
    names = set()
    for pattern in targets:
        hits = {name for name, _ in iter_matching_parameters(model, [pattern])}
        if not hits:
            raise TargetError(
                f"{method}: target pattern {pattern!r} matches no module of {type(model).__name__}. "
                f"Modules of this model:\n{module_name_summary(model)}"
            )
        names |= hits
    return names


def apply_bitfit(model: nn.Module, targets: Sequence[str] | None = None, last_k_blocks: int | None = None) -> list[str]:
    """Unfreeze the ``bias`` parameters (of the modules matching ``targets``; all by default; in the last
    ``last_k_blocks`` blocks only when set).

    Returns:
        The names of the parameters made trainable.
    """
    scope = _scoped(model, targets, "bitfit", last_k_blocks)
    names = []
    for name, param in model.named_parameters():
        if name in scope and name.rsplit(".", 1)[-1] == "bias" and not is_adapter_name(name):
            param.requires_grad_(True)
            names.append(name)
    if not names:
        raise TargetError(f"bitfit: the targeted modules of {type(model).__name__} have no bias parameter.")
    return names


def apply_norm(model: nn.Module, targets: Sequence[str] | None = None, last_k_blocks: int | None = None) -> list[str]:
    """Unfreeze the weight and bias of every LayerNorm (inside the modules matching ``targets``; all by default; in
    the last ``last_k_blocks`` blocks only when set).

    Returns:
        The names of the parameters made trainable.
    """
    scope = _scoped(model, targets, "norm", last_k_blocks)
    names = []
    for module_name, module in model.named_modules():
        if not is_layer_norm(module) or is_adapter_name(module_name):
            continue
        for pname, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if full in scope:
                param.requires_grad_(True)
                names.append(full)
    if not names:
        raise TargetError(
            f"norm: the targeted modules of {type(model).__name__} have no LayerNorm. "
            f"Modules of this model:\n{module_name_summary(model)}"
        )
    return names
