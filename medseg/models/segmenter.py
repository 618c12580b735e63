"""Backbone + adapters + dense decoder as one 2-D segmentation model, and its Hydra builder.

Intensity convention. The data pipeline gives images in [0, 1] (CT: a HU window; MRI with ``mode: minmax``) or
z-scored (MRI with ``mode: zscore``). The model maps them to the backbone's pretrained convention itself, so the
data config never depends on the backbone: ``input_range="unit"`` applies :meth:`Backbone.normalise` (SAM: 0-255
and SAM's pixel statistics; DINOv2/MAE: ImageNet mean/std; LiteMedSAM: unchanged); ``"zscore"`` first maps
``z -> z / 6 + 0.5`` (+-3 standard deviations onto [0, 1], nothing clipped), then normalises the same way.

Input size. The backbone runs at ``img_size`` x ``img_size`` pixels, or with ``img_size=None`` at the input's size
rounded to the nearest multiple of the patch size (DINOv2: 256 -> 252 px). An input of another size is bilinearly
resized to it and the logits are resized back, so the output always has the input's size. With the slice sampler's
size equal to ``img_size`` (or a patch multiple), nothing is resized.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.adapters.apply import apply_adapters
from medseg.adapters.report import parameter_report
from medseg.adapters.targets import is_adapter_name
from medseg.backbones.base import Backbone
from medseg.backbones.components import build_components
from medseg.backbones.litemedsam import LiteMedSAMBackbone
from medseg.backbones.registry import create_backbone, get_entry
from medseg.backbones.sam import SamBackbone
from medseg.errors import ConfigError, InputShapeError
from medseg.models.dense import LinearDecoder, UNETRDecoder
from medseg.models.param_groups import make_param_groups
from medseg.models.sam_mask import SamMaskDecoder

__all__ = ["DECODERS", "INPUT_RANGES", "Segmenter", "apply_adapter_config", "build_segmenter"]

DECODERS = ("linear", "unetr", "sam_mask")
INPUT_RANGES = ("unit", "minmax", "zscore")  # minmax: [0, 1] as well (the MRI preprocessing's name)
# Adapter "methods" whose parameters are pretrained backbone parameters trained in full, i.e. at the backbone rate.
_FULL_METHODS = {"full", "trainable"}


class Segmenter(nn.Module):
    """A 2-D segmentation model: ``decoder(backbone(normalise(image)))`` at ``img_size``, logits at the input size.

    Attributes:
        backbone: a :class:`~medseg.backbones.base.Backbone` (adapters, if any, live inside it).
        decoder: a dense decoder (``layers`` attribute, ``forward(BackboneOutput, image) -> logits``).
        adapter_names: backbone parameters an adapter method trains (LoRA matrices, BitFit's biases...); they get
            the decoder's learning rate in :meth:`param_groups`.
    """

    spatial_dims = 2

    def __init__(
        self,
        backbone: Backbone,
        decoder: nn.Module,
        num_classes: int,
        in_channels: int,
        img_size: int | None = None,
        input_range: str = "unit",
        adapter_names: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        if input_range not in INPUT_RANGES:
            raise ConfigError(f"input_range must be one of {INPUT_RANGES}, got {input_range!r}")
        self.backbone = backbone
        self.decoder = decoder
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.img_size = img_size
        self.input_range = input_range
        self.adapter_names = set(adapter_names)

    def working_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Side lengths (pixels) the backbone runs at: ``img_size``, or the input's snapped to the patch grid."""
        if self.img_size is not None:
            return (self.img_size, self.img_size)
        patch = self.backbone.patch_size
        return tuple(max(patch, round(s / patch) * patch) for s in size)

    def to_backbone_input(self, image: torch.Tensor) -> torch.Tensor:
        """Map the data pipeline's intensities to the backbone's pretrained convention (see the module docstring)."""
        if self.input_range == "zscore":  # +-3 SD onto [0, 1]
            image = image / 6.0 + 0.5
        return self.backbone.normalise(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Args:
            image: ``(B, in_channels, H, W)``, in [0, 1] or z-scored as ``input_range`` says.

        Returns:
            Logits ``(B, num_classes, H, W)``.
        """
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise InputShapeError(
                f"{type(self).__name__} takes 2-D batches (B, {self.in_channels}, H, W), got {tuple(image.shape)}; "
                f"3-D volumes are predicted slice by slice by the inference code."
            )
        size = tuple(image.shape[-2:])
        x = image
        target = self.working_size(size)
        if target != size:
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        x = self.to_backbone_input(x)
        logits = self.decoder(self.backbone(x, layers=self.decoder.layers), x)
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def param_groups(
        self,
        lr: float,
        backbone_lr_scale: float = 0.1,
        layer_decay: float | None = None,
        weight_decay: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Decoder and adapter parameters at ``lr``, the backbone at ``lr * backbone_lr_scale`` with optional
        layer-wise decay (block ``i`` of ``N``: ``* layer_decay ** (N - i)``); only trainable parameters.

        See :func:`medseg.models.param_groups.make_param_groups`.
        """
        adapters = self.adapter_names | {n for n, _ in self.backbone.named_parameters() if is_adapter_name(n)}
        return make_param_groups(
            {"backbone": self.backbone.named_parameters(), "decoder": self.decoder.named_parameters()},
            lr=lr,
            backbone=self.backbone,
            adapter_names=adapters,
            backbone_lr_scale=backbone_lr_scale,
            layer_decay=layer_decay,
            weight_decay=weight_decay,
        )

    def trainable_report(self) -> dict[str, Any]:
        """``medseg.adapters.parameter_report`` of the model, its ``head`` group named ``decoder``.

        Groups: ``backbone`` (pretrained parameters, whether an adapter unfroze them or not), ``adapters``
        (parameters adapters added), ``decoder``; percentages are of the model total.
        """
        report = parameter_report(self)
        report["groups"]["decoder"] = report["groups"].pop("head")
        return report


def apply_adapter_config(backbone: Backbone, adapter: Any) -> set[str]:
    """Apply an adapter config (``AdapterConfig``, a mapping of its arguments, or ``None``) to ``backbone`` in place.

    ``None`` leaves the backbone as built: every parameter trains (full fine-tuning), without marking it adapted.

    Returns:
        Names of the backbone parameters the adapter methods train (``full`` and ``trainable`` patterns excluded:
        they are backbone parameters at the backbone's rate).
    """
    if adapter is None:
        return set()

    report = apply_adapters(backbone, adapter)
    return {name for method, names in report["trained"].items() if method not in _FULL_METHODS for name in names}


def _sam_family_backbone(
    name: str,
    pretrained: bool,
    checkpoint: str | Path | None,
    img_size: int | None,
    in_channels: int,
    channel_mode: str,
    arch: Mapping[str, Any] | None,
    num_classes: int,
) -> tuple[Backbone, nn.Module]:
    """Backbone and ``sam_mask`` decoder from one SAM / LiteMedSAM checkpoint read (encoder and decoder together)."""
    family = get_entry(name).family
    if family == "litemedsam":
        components = build_components(name, pretrained, checkpoint, img_size=img_size, arch=arch)
        backbone = LiteMedSAMBackbone(components.image_encoder, in_channels=in_channels, channel_mode=channel_mode)
    elif family == "sam":
        components = build_components(name, pretrained, checkpoint, img_size=img_size, arch=arch)
        backbone = SamBackbone(components.image_encoder, name=name, in_channels=in_channels, channel_mode=channel_mode)
    else:
        raise ConfigError(
            f"decoder 'sam_mask' needs a SAM-family backbone (sam_vit_b/l/h, litemedsam) for its pretrained mask "
            f"decoder and 256-channel image embedding; {name!r} is a {family} backbone: use decoder 'unetr' or "
            f"'linear' (model=vit_unetr / model=vit_linear)."
        )
    return backbone, SamMaskDecoder(components.mask_decoder, components.prompt_encoder, num_classes)


def build_segmenter(
    backbone: str,
    pretrained: bool,
    checkpoint: str | None,
    decoder: str,
    num_classes: int,
    in_channels: int,
    adapter: Any = None,
    img_size: int | None = None,
    grad_checkpointing: bool | int | str = False,
    *,
    attention: str = "fused",
    input_range: str = "unit",
    channel_mode: str = "repeat",
    arch: Mapping[str, Any] | None = None,
    **decoder_kwargs: Any,
) -> Segmenter:
    """Build a 2-D segmenter: backbone (pretrained or its scratch twin), adapters, decoder.

    ``pretrained`` (the ``init`` switch) changes only the initial weights of the backbone and, for ``sam_mask``, of
    SAM's mask decoder: names, shapes, and everything else are identical, so the comparison is fair.

    Args:
        backbone: registry name (``sam_vit_b``, ``litemedsam``, ``dinov2_vits14``, ``mae_vit_base``...).
        pretrained: official weights (``True``) or the standard initialisation.
        checkpoint: explicit checkpoint path; ``None`` looks in ``$MEDSEG_WEIGHTS`` (LiteMedSAM: its package).
        decoder: ``linear``, ``unetr`` or ``sam_mask`` (SAM family only).
        num_classes: output channels, background included (from the data module).
        in_channels: image channels (from the data module).
        adapter: an ``AdapterConfig`` (``conf/adapter``), a mapping of its arguments, or ``None`` (full fine-tuning).
        img_size: side in pixels the backbone runs at (SAM: a multiple of 16, the encoder is built for it;
            DINOv2: a multiple of 14; LiteMedSAM: 256). ``None``: the input's size snapped to the patch grid (SAM's
            encoder is then built for 1024 px and interpolates its position embeddings).
        grad_checkpointing: activation checkpointing of the backbone blocks: ``none``/``false``, ``all``/``true``, or
            every ``k``-th block (the configs pass ``backbone.activation_checkpointing``); saves memory at 1024 px for
            about one more forward pass per step.
        attention: ``fused`` (SDPA kernels, default) or ``reference`` attention in the backbone
            (``backbone.attention``).
        input_range: ``unit`` or ``minmax`` ([0, 1] input) or ``zscore`` (see the module docstring).
        channel_mode: how ``in_channels`` map onto RGB (``repeat`` or ``project``).
        arch: backbone architecture overrides, for tiny test models only.
        **decoder_kwargs: options of the decoder: ``linear``: ``batch_norm``; ``unetr``: ``layers``,
            ``feature_size``, ``norm_name``.

    Raises:
        ConfigError: unknown decoder or options, a decoder that does not fit the backbone, or a bad
            ``grad_checkpointing``/``attention`` value.
    """
    if decoder not in DECODERS:
        raise ConfigError(f"Unknown decoder {decoder!r}. Available: {', '.join(DECODERS)}.")
    family = get_entry(backbone).family
    if family == "litemedsam" and img_size not in (None, 256):
        raise ConfigError(f"LiteMedSAM runs at 256 x 256 pixels only; set img_size=256 (got {img_size}).")
    if decoder == "sam_mask":
        if decoder_kwargs:
            raise ConfigError(f"decoder 'sam_mask' takes no options, got {sorted(decoder_kwargs)}")
        size = None if family == "litemedsam" else img_size
        net, head = _sam_family_backbone(
            backbone, pretrained, checkpoint, size, in_channels, channel_mode, arch, num_classes
        )
    else:
        kwargs: dict[str, Any] = {"in_channels": in_channels, "channel_mode": channel_mode}
        if family != "litemedsam":
            kwargs["img_size"] = img_size
            if arch is not None:
                kwargs["arch"] = arch
        if family == "sam" and img_size is None:
            kwargs.pop("img_size")
        net = create_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
        try:
            if decoder == "linear":
                head = LinearDecoder(net.embed_dim, num_classes, **decoder_kwargs)
            else:
                head = UNETRDecoder.for_backbone(net, in_channels, num_classes, **decoder_kwargs)
        except TypeError as err:
            raise ConfigError(f"decoder {decoder!r}: {err}") from err
    net.set_attention(attention)
    net.set_activation_checkpointing(grad_checkpointing)
    adapter_names = apply_adapter_config(net, adapter)
    return Segmenter(net, head, num_classes, in_channels, img_size, input_range, adapter_names)
