"""Backbone + pooling + head as one image (2-D) or volume (3-D) classifier, and MONAI CNN baselines from scratch.

A :class:`Classifier` maps ``(B, C, H, W)`` images, or ``(B, C, H, W, D)`` volumes, to ``(B, K)`` logits:

* 2-D: the image is resized to the backbone's working size, mapped to its pretrained intensity convention (as in
  :class:`~medseg.models.segmenter.Segmenter`), encoded, and pooled to one vector (:mod:`medseg.models.pooling`);
* 3-D: the ``D`` slices along the last axis go through the 2-D backbone as one batch of ``B * D`` images,
  volume-major, inside :func:`medseg.adapters.volume_depth`, so an ``adapter3d`` in the backbone convolves across
  slices (the volumetric adapter path) while any other backbone sees independent slices; the slice vectors are then
  aggregated (mean or attention).

The head is a linear layer, or for the kNN protocol a :class:`~medseg.models.knn.KNNHead` that returns probabilities
itself (``outputs_probabilities``). :meth:`Classifier.probabilities` applies the right activation: softmax for
binary, multi-class and ordinal labels, sigmoid for multi-label.

:class:`CNNClassifier` wraps MONAI's ``DenseNet121`` or ``ResNet`` (2-D or 3-D) trained from scratch, the reference a
foundation model must beat; it has the same ``embed``/``head``/``probabilities`` interface, so every protocol runs on
it too (kNN and linear probes then measure random features, which is the honest scratch baseline for them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks import nets
from torch import nn

from medseg.adapters.adapter3d import volume_depth
from medseg.adapters.report import parameter_report
from medseg.adapters.targets import is_adapter_name
from medseg.backbones.base import Backbone
from medseg.backbones.registry import create_backbone, get_entry
from medseg.data.classification import LABEL_KINDS
from medseg.errors import ConfigError, InputShapeError
from medseg.models.param_groups import count_report, make_param_groups
from medseg.models.pooling import SliceAggregation, TokenPooling
from medseg.models.segmenter import INPUT_RANGES, apply_adapter_config

__all__ = ["CNN_BASELINES", "CNNClassifier", "Classifier", "build_classifier", "build_cnn_classifier"]

CNN_BASELINES = ("densenet121", "resnet18", "resnet34", "resnet50")


class _ProbabilityMixin:
    label_kind: str
    head: nn.Module

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` probabilities: softmax (single-label) or sigmoid (multi-label) of the logits."""
        return self.activate(self(image))

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities from this model's head outputs (a kNN head already gives probabilities)."""
        if getattr(self.head, "outputs_probabilities", False):
            return logits
        return torch.sigmoid(logits) if self.label_kind == "multilabel" else logits.softmax(dim=-1)


class Classifier(_ProbabilityMixin, nn.Module):
    """A backbone with a pooled linear head; see the module docstring.

    Args:
        backbone: a :class:`~medseg.backbones.base.Backbone` (adapters, if any, applied to it already).
        num_outputs: ``K`` (2 for binary labels).
        in_channels: image channels.
        label_kind: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal`` (chooses the activation).
        pooling: ``cls``, ``mean`` or ``attention``.
        aggregation: ``mean`` or ``attention`` over slices (3-D only).
        spatial_dims: 2 for images, 3 for volumes.
        img_size: side in pixels the backbone runs at; ``None``: the input's size snapped to the patch grid.
        input_range: ``unit``/``minmax`` ([0, 1] input) or ``zscore``.
        adapter_names: backbone parameters an adapter trains (they get the head's learning rate).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_outputs: int,
        in_channels: int,
        label_kind: str = "multiclass",
        pooling: str = "mean",
        aggregation: str = "mean",
        spatial_dims: int = 2,
        img_size: int | None = None,
        input_range: str = "unit",
        adapter_names: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        if input_range not in INPUT_RANGES:
            raise ConfigError(f"model.input_range must be one of {INPUT_RANGES}, got {input_range!r}.")
        if label_kind not in LABEL_KINDS or spatial_dims not in (2, 3):
            raise ConfigError(f"label_kind {label_kind!r} / spatial_dims {spatial_dims} not in {LABEL_KINDS} / (2, 3).")
        self.backbone = backbone
        self.pool = TokenPooling(pooling, backbone.embed_dim)
        self.aggregate = SliceAggregation(aggregation, backbone.embed_dim) if spatial_dims == 3 else None
        self.head: nn.Module = nn.Linear(backbone.embed_dim, num_outputs)
        self.embed_dim, self.num_outputs, self.in_channels = backbone.embed_dim, num_outputs, in_channels
        self.label_kind, self.spatial_dims, self.img_size, self.input_range = (
            label_kind,
            spatial_dims,
            img_size,
            input_range,
        )
        self.adapter_names = set(adapter_names)

    @property
    def features_are_fixed(self) -> bool:
        """Whether ``embed`` has no learned part outside the backbone (so frozen features can be cached)."""
        return self.pool.parameter_free and (self.aggregate is None or self.aggregate.parameter_free)

    def encoder_modules(self) -> dict[str, nn.Module]:
        """The modules ``embed`` depends on (hashed for feature-cache keys); the head is not among them."""
        modules = {"backbone": self.backbone, "pool": self.pool}
        if self.aggregate is not None:
            modules["aggregate"] = self.aggregate
        return modules

    def feature_signature(self) -> str:
        """Everything in the model that changes ``embed`` besides the weights (for feature-cache keys)."""
        aggregation = self.aggregate.mode if self.aggregate is not None else "none"
        return (
            f"pool={self.pool.mode}|aggregate={aggregation}|dims={self.spatial_dims}|size={self.img_size}|"
            f"range={self.input_range}|backbone={getattr(self.backbone, 'name', type(self.backbone).__name__)}"
        )

    def _encode_slices(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        if self.img_size is not None:
            target = (self.img_size, self.img_size)
        else:
            patch = self.backbone.patch_size
            target = tuple(max(patch, round(s / patch) * patch) for s in size)
        if target != size:
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        if self.input_range == "zscore":
            x = x / 6.0 + 0.5
        return self.pool(self.backbone(self.backbone.normalise(x)))

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, embed_dim)`` image or volume embedding (what the head sees and the feature cache stores)."""
        expected = 2 + self.spatial_dims
        if image.ndim != expected or image.shape[1] != self.in_channels:
            raise InputShapeError(
                f"{type(self).__name__} ({self.spatial_dims}-D) takes (B, {self.in_channels}, H, W"
                f"{', D' if self.spatial_dims == 3 else ''}), got {tuple(image.shape)}; set data.spatial_dims and "
                f"data.in_channels to match the images."
            )
        if self.spatial_dims == 2:
            return self._encode_slices(image)
        b, c, h, w, d = image.shape
        slices = image.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)  # volume-major: slices of volume 0 first
        with volume_depth(self.backbone, d):
            vectors = self._encode_slices(slices)
        return self.aggregate(vectors.reshape(b, d, -1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` logits (a kNN head: probabilities)."""
        return self.head(self.embed(image))

    def param_groups(
        self, lr: float, backbone_lr_scale: float = 0.1, layer_decay: float | None = None, weight_decay: float = 0.0
    ) -> list[dict]:
        """Head, pooling and adapters at ``lr``; backbone at ``lr * backbone_lr_scale`` with optional layer decay."""
        adapters = self.adapter_names | {n for n, _ in self.backbone.named_parameters() if is_adapter_name(n)}
        heads = [(f"head.{n}", p) for n, p in self.head.named_parameters()]
        heads += [(f"pool.{n}", p) for n, p in self.pool.named_parameters()]
        if self.aggregate is not None:
            heads += [(f"aggregate.{n}", p) for n, p in self.aggregate.named_parameters()]
        return make_param_groups(
            {"backbone": self.backbone.named_parameters(), "head": heads}, lr=lr, backbone=self.backbone,
            adapter_names=adapters, backbone_lr_scale=backbone_lr_scale, layer_decay=layer_decay,
            weight_decay=weight_decay,
        )  # fmt: skip

    def trainable_report(self) -> dict[str, Any]:
        """``medseg.adapters.parameter_report``: groups ``backbone``, ``adapters``, ``head`` (pooling included)."""
        return parameter_report(self)


class CNNClassifier(_ProbabilityMixin, nn.Module):
    """A MONAI ``DenseNet121``/``ResNet`` from scratch, split into a feature extractor and its final linear layer."""

    def __init__(self, name: str, num_outputs: int, in_channels: int, label_kind: str, spatial_dims: int = 2) -> None:
        super().__init__()
        if name not in CNN_BASELINES:
            raise ConfigError(f"model.name must be one of {CNN_BASELINES}, got {name!r}.")
        if name == "densenet121":
            net = nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_outputs)
            self.head = net.class_layers.out
            net.class_layers.out = nn.Identity()
        else:
            net = getattr(nets, name)(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_outputs)
            self.head = net.fc
            net.fc = nn.Identity()
        self.net, self.name = net, name
        self.embed_dim, self.num_outputs, self.in_channels = self.head.in_features, num_outputs, in_channels
        self.label_kind, self.spatial_dims = label_kind, spatial_dims
        self.features_are_fixed = True

    def encoder_modules(self) -> dict[str, nn.Module]:
        """The feature extractor (hashed for feature-cache keys)."""
        return {"net": self.net}

    def feature_signature(self) -> str:
        """The architecture and dimensionality (for feature-cache keys)."""
        return f"cnn={self.name}|dims={self.spatial_dims}"

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` globally pooled features of the last stage."""
        if image.ndim != 2 + self.spatial_dims or image.shape[1] != self.in_channels:
            raise InputShapeError(f"{self.name} ({self.spatial_dims}-D) got an input of shape {tuple(image.shape)}.")
        return self.net(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(image))

    def param_groups(self, lr: float, weight_decay: float = 0.0, **_: Any) -> list[dict]:
        """Every trainable parameter at ``lr`` (a scratch network has no pretrained part to slow down)."""
        named = [(f"net.{n}", p) for n, p in self.net.named_parameters()]
        named += [(f"head.{n}", p) for n, p in self.head.named_parameters()]
        return make_param_groups({"model": named}, lr=lr, weight_decay=weight_decay)

    def trainable_report(self) -> dict[str, Any]:
        return count_report({"backbone": self.net.parameters(), "head": self.head.parameters()})


def build_classifier(
    backbone: str,
    pretrained: bool,
    checkpoint: str | Path | None,
    num_outputs: int,
    in_channels: int,
    label_kind: str = "multiclass",
    adapter: Any = None,
    pooling: str = "mean",
    aggregation: str = "mean",
    spatial_dims: int = 2,
    img_size: int | None = None,
    input_range: str = "unit",
    channel_mode: str = "repeat",
    arch: Mapping[str, Any] | None = None,
    attention: str = "fused",
    grad_checkpointing: bool | int | str = False,
) -> Classifier:
    """Build a classifier on a registry backbone (pretrained or its scratch twin), with an adapter config applied.

    ``pretrained`` (the ``init`` switch) changes only the backbone's initial weights. ``num_outputs``,
    ``in_channels``, ``label_kind`` and ``spatial_dims`` come from the data module; the rest from ``conf/model``.
    ``arch`` overrides the architecture, for tiny test models only. ``attention`` and ``grad_checkpointing`` are the
    backbone's compute settings (``backbone.attention``, ``backbone.activation_checkpointing``).
    """
    family = get_entry(backbone).family
    kwargs: dict[str, Any] = {"in_channels": in_channels, "channel_mode": channel_mode}
    if family == "litemedsam":
        if img_size not in (None, 256):
            raise ConfigError(f"LiteMedSAM runs at 256 x 256 pixels only; set model.img_size=256 (got {img_size}).")
        img_size = None  # fixed by the architecture: set from its input spec below
    else:
        if img_size is not None or family != "sam":
            kwargs["img_size"] = img_size
        if arch is not None:
            kwargs["arch"] = arch
    net = create_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    if family == "litemedsam":
        img_size = net.input_spec.image_size
    net.set_attention(attention)
    net.set_activation_checkpointing(grad_checkpointing)
    adapter_names = apply_adapter_config(net, adapter)
    return Classifier(
        net, num_outputs, in_channels, label_kind, pooling, aggregation, spatial_dims, img_size, input_range,
        adapter_names,
    )  # fmt: skip


def build_cnn_classifier(
    name: str,
    num_outputs: int,
    in_channels: int,
    label_kind: str = "multiclass",
    spatial_dims: int = 2,
    adapter: Any = None,
) -> CNNClassifier:
    """A from-scratch MONAI CNN classifier; ``adapter`` may only be ``frozen`` (kNN/linear probes) or ``full``/None."""
    model = CNNClassifier(name, num_outputs, in_channels, label_kind, spatial_dims)
    methods = _adapter_methods(adapter)
    if methods == ["frozen"]:
        for param in model.net.parameters():
            param.requires_grad_(False)
    elif methods not in ([], ["full"]):
        raise ConfigError(
            f"{name} is a CNN trained from scratch: parameter-efficient adapters {methods} apply to ViT backbones "
            f"only; use protocol=full (or knn/linear for frozen random features)."
        )
    return model


def _adapter_methods(adapter: Any) -> list[str]:
    if adapter is None:
        return []
    if hasattr(adapter, "methods"):
        return list(adapter.methods)
    if isinstance(adapter, Mapping):
        return [adapter["method"]] if "method" in adapter else [m["method"] for m in adapter.get("methods", [])]
    raise ConfigError(f"model.adapter must be an adapter config or null, got {type(adapter).__name__}.")
