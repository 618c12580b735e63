"""``ssf``: Scale and Shift the deep Features (Lian et al. 2022) after chosen linear and LayerNorm layers.

For each targeted layer ``f``, ``f(x)`` becomes ``gamma * f(x) + beta`` with per-feature ``gamma`` (init 1) and
``beta`` (init 0), so the model equals the base model at initialisation. ``gamma``/``beta`` are the parameters
``ssf_scale``/``ssf_shift`` registered on the layer itself, applied by a forward hook: base parameter names do not
change. Because the transform is affine and acts on the layer's output features, it folds into the layer for
inference (:func:`merge_ssf`): ``W <- diag(gamma) W``, ``b <- gamma * b + beta`` for a linear layer, and likewise for
a LayerNorm's weight and bias; the merged model has no extra cost. :func:`unmerge_ssf` divides it back out.

Targets are ``nn.Linear`` and ``nn.LayerNorm`` (affine) layers, so SSF applies to every family, TinyViT included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.adapters.blocks import late_sites
from medseg.adapters.targets import in_scope, resolve_targets
from medseg.errors import ConfigError

__all__ = ["DEFAULT_SSF_TARGETS", "apply_ssf", "merge_ssf", "ssf_layers", "unmerge_ssf"]

#: Every projection, MLP layer and LayerNorm of the transformer blocks, as in the SSF paper.
DEFAULT_SSF_TARGETS = ("qkv", "proj", "mlp", "*norm*")


class _SSFHook:
    """Forward hook: ``output * ssf_scale + ssf_shift`` on the last dimension, unless merged into the weights."""

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if module._ssf_merged:
            return output
        return output * module.ssf_scale + module.ssf_shift


def _base(module: nn.Module) -> nn.Module:
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def _features(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if layer.weight is None or len(layer.normalized_shape) != 1:
        raise ConfigError(f"ssf: LayerNorm {layer} must be elementwise-affine over one dimension to merge SSF.")
    return layer.normalized_shape[0]


def apply_ssf(
    model: nn.Module, targets: Sequence[str] = DEFAULT_SSF_TARGETS, last_k_blocks: int | None = None
) -> list[str]:
    """Add a scale and shift after each linear/LayerNorm layer matching ``targets`` (in the last ``last_k_blocks``).

    Returns:
        The names of the parameters made trainable.
    """
    names = []
    found = resolve_targets(model, targets, (nn.Linear, nn.LayerNorm), "ssf")
    scope = in_scope(list(found), late_sites(model, last_k_blocks, "ssf"), targets, "ssf")
    for name, module in ((n, found[n]) for n in scope):
        layer = _base(module)
        if hasattr(layer, "ssf_scale"):
            continue
        features = _features(layer)
        ref = layer.weight
        layer.ssf_scale = nn.Parameter(torch.ones(features, device=ref.device, dtype=ref.dtype))
        layer.ssf_shift = nn.Parameter(torch.zeros(features, device=ref.device, dtype=ref.dtype))
        layer._ssf_merged = False
        layer.register_forward_hook(_SSFHook())
        prefix = f"{name}.base_layer" if layer is not module else name
        names += [f"{prefix}.ssf_scale", f"{prefix}.ssf_shift"]
    return names


def ssf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` that carry SSF parameters."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "ssf_scale") and hasattr(m, "_ssf_merged")]


@torch.no_grad()
def merge_ssf(model: nn.Module) -> list[str]:
    """Fold every SSF scale/shift into its layer's weight and bias; returns the merged layer names.

    A layer without a bias can only absorb a zero shift; merging a non-zero shift into it is an error.
    """
    merged = []
    for name, layer in ssf_layers(model):
        if layer._ssf_merged:
            continue
        scale, shift = layer.ssf_scale, layer.ssf_shift
        view = scale.view(-1, *([1] * (layer.weight.ndim - 1)))
        layer.weight.mul_(view)
        if layer.bias is None:
            if torch.any(shift != 0):
                raise ConfigError(f"ssf: cannot merge into {name}: it has no bias to absorb the shift.")
        else:
            layer.bias.mul_(scale).add_(shift)
        layer._ssf_merged = True
        merged.append(name)
    return merged


@torch.no_grad()
def unmerge_ssf(model: nn.Module) -> list[str]:
    """Undo :func:`merge_ssf` (divides the scale back out); returns the unmerged layer names."""
    unmerged = []
    for name, layer in ssf_layers(model):
        if not layer._ssf_merged:
            continue
        scale, shift = layer.ssf_scale, layer.ssf_shift
        if layer.bias is not None:
            layer.bias.sub_(shift).div_(scale)
        layer.weight.div_(scale.view(-1, *([1] * (layer.weight.ndim - 1))))
        layer._ssf_merged = False
        unmerged.append(name)
    return unmerged
