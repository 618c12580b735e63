"""Optimizer parameter groups: decoder and adapters at the base learning rate, the backbone slower, layer by layer.

Fine-tuning a pretrained encoder at the decoder's learning rate destroys what pretraining learnt in the first steps,
so the backbone gets ``lr * backbone_lr_scale`` and, optionally, layer-wise learning-rate decay as in BEiT / MAE
fine-tuning: block ``i`` of ``N`` gets ``lr * backbone_lr_scale * decay ** (N - i)``, the embeddings in front of the
first block ``decay ** (N + 1)``, and what follows the last block (final norm, SAM/TinyViT neck) no decay.

Where a parameter sits is read from the registration order of the backbone's parameters, which for every family
(SAM, timm ViT, TinyViT) is the forward order: a parameter inside block ``i`` has layer ``i + 1``; one before the first
block (channel adapter, patch embedding, position embedding, class/register tokens) layer ``0``; one between blocks
(TinyViT's patch merging between stages) the layer of the block that follows it; one after the last block ``N + 1``.

Weight decay is not applied to biases, normalisation weights and other 1-D tensors, nor to position embeddings and
learned tokens (timm's and MAE's convention).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from medseg.errors import ConfigError

__all__ = [
    "NO_DECAY_SUFFIXES",
    "backbone_blocks",
    "backbone_layer_ids",
    "count_report",
    "make_param_groups",
    "no_weight_decay",
]

#: Parameter names (suffixes) that are embeddings or tokens, never weight-decayed.
NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "reg_token", "iou_token.weight", "class_tokens.weight")


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The transformer blocks that ``backbone.num_blocks`` counts, in forward order.

    Raises:
        ConfigError: the backbone is of no known family, or its block count disagrees with ``num_blocks``.
    """
    if hasattr(backbone, "vit"):  # timm ViT (DINOv2, MAE)
        blocks = list(backbone.vit.blocks)
    elif hasattr(backbone, "image_encoder") and hasattr(backbone.image_encoder, "blocks"):  # SAM ViT
        blocks = list(backbone.image_encoder.blocks)
    elif hasattr(backbone, "image_encoder") and hasattr(backbone.image_encoder, "layers"):  # TinyViT stages
        blocks = [block for layer in backbone.image_encoder.layers for block in layer.blocks]
    else:
        raise ConfigError(f"layer-wise LR decay: {type(backbone).__name__} has no known block layout")
    if len(blocks) != getattr(backbone, "num_blocks", len(blocks)):
        raise ConfigError(f"{type(backbone).__name__}: found {len(blocks)} blocks, num_blocks={backbone.num_blocks}")
    return blocks


def backbone_layer_ids(backbone: nn.Module) -> dict[str, int]:
    """Layer index of every backbone parameter by name (see the module docstring): 0 .. num_blocks + 1."""
    blocks = backbone_blocks(backbone)
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    names = [(name, block_of.get(id(p))) for name, p in backbone.named_parameters()]
    ids: dict[str, int] = {}
    pending: list[str] = []  # parameters after block i and before block i + 1: they take the next block's layer
    seen_block = False
    for name, block in names:
        if block is None:
            if seen_block:
                pending.append(name)
            else:
                ids[name] = 0
            continue
        seen_block = True
        for other in pending:
            ids[other] = block + 1
        pending = []
        ids[name] = block + 1
    for other in pending:
        ids[other] = len(blocks) + 1
    return ids


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms, 1-D tensors, position embeddings and learned tokens are not weight-decayed."""
    return param.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES)


def _add(groups: dict, key: tuple, name: str, param: nn.Parameter, lr: float, weight_decay: float, scale: float):
    if key not in groups:
        groups[key] = {
            "name": ".".join(str(k) for k in key),
            "params": [],
            "param_names": [],
            "lr": lr,
            "lr_scale": scale,
            "weight_decay": weight_decay,
        }
    groups[key]["params"].append(param)
    groups[key]["param_names"].append(name)


def make_param_groups(
    parts: dict[str, Iterable[tuple[str, nn.Parameter]]],
    lr: float,
    backbone: nn.Module | None = None,
    adapter_names: Iterable[str] = (),
    backbone_lr_scale: float = 0.1,
    layer_decay: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Torch optimizer parameter groups for a model made of named parts.

    Args:
        parts: ``{"backbone": backbone.named_parameters(), "decoder": ..., ...}``. Every part other than
            ``"backbone"`` trains at ``lr``.
        lr: base learning rate (decoder, adapters).
        backbone: the backbone module, needed for ``layer_decay``.
        adapter_names: backbone parameter names that belong to the adapter method (parameters it added, or the
            pretrained ones it unfroze, e.g. BitFit's biases); they train at ``lr`` as a group ``"adapters"``.
        backbone_lr_scale: factor on ``lr`` for the other trainable backbone parameters.
        layer_decay: BEiT-style layer-wise decay factor in (0, 1]; ``None`` gives one backbone learning rate.
        weight_decay: decoupled weight decay for matrices and convolution kernels (not biases, norms, tokens).

    Returns:
        Groups with ``params``, ``lr``, ``weight_decay``, plus ``name``, ``lr_scale`` (relative to ``lr``) and
        ``param_names`` for logging. Only parameters with ``requires_grad`` appear, each exactly once.
    """
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    adapter_names = set(adapter_names)
    layer_ids: dict[str, int] = {}
    num_layers = 0
    if layer_decay is not None and backbone is not None:
        layer_ids = backbone_layer_ids(backbone)
        num_layers = len(backbone_blocks(backbone)) + 1
    groups: dict[tuple, dict] = {}
    seen: set[int] = set()
    for part, named in parts.items():
        for name, param in named:
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            decay = 0.0 if no_weight_decay(name, param) else weight_decay
            tag = "no_wd" if decay == 0.0 else "wd"
            if part != "backbone":
                _add(groups, (part, tag), name, param, lr, decay, 1.0)
            elif name in adapter_names:
                _add(groups, ("adapters", tag), name, param, lr, decay, 1.0)
            elif layer_decay is None:
                _add(groups, ("backbone", tag), name, param, lr * backbone_lr_scale, decay, backbone_lr_scale)
            else:
                layer = layer_ids[name]
                scale = backbone_lr_scale * layer_decay ** (num_layers - layer)
                _add(groups, ("backbone", f"layer{layer}", tag), name, param, lr * scale, decay, scale)
    return list(groups.values())


def count_report(parts: dict[str, Iterable[nn.Parameter]], methods: Iterable[str] = ()) -> dict[str, Any]:
    """Trainable and total parameter counts per part, in the layout of ``medseg.adapters.parameter_report``.

    Returns:
        ``{"trainable", "total", "trainable_percent", "methods", "groups": {part: {"trainable", "total",
        "trainable_percent"}}}``; percentages are of the model total. A parameter shared between parts counts once.
    """
    groups: dict[str, dict[str, float]] = {}
    seen: set[int] = set()
    for part, params in parts.items():
        group = groups.setdefault(part, {"trainable": 0, "total": 0})
        for param in params:
            if id(param) in seen:
                continue
            seen.add(id(param))
            group["total"] += param.numel()
            group["trainable"] += param.numel() if param.requires_grad else 0
    total = sum(g["total"] for g in groups.values())
    trainable = sum(g["trainable"] for g in groups.values())
    for group in groups.values():
        group["trainable_percent"] = 100.0 * group["trainable"] / total if total else 0.0
    return {
        "trainable": trainable,
        "total": total,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "methods": list(methods),
        "groups": groups,
    }
