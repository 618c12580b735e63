"""``VolumetricPromptableSegmenter``: a 2-D pretrained ViT lifted to 3-D promptable segmentation (3DSAM-adapter).

Following Gong et al. 2024 ("3DSAM-adapter: Holistic adaptation of SAM from 2D to 3D for promptable tumor
segmentation"), the pretrained 2-D ViT is kept and taught to see volumes:

* **Slices through the pretrained patch embedding.** A volume ``(B, C, X, Y, Z)`` is cut along ``slice_axis`` (default
  2, the axial ``Z`` of MONAI's channel-first ``(C, X, Y, Z)`` patches after ``Orientationd("RAS")``) into ``B * D``
  slices, volume-major, which the ViT embeds and encodes as a batch of images.
* **A learned depth position embedding** (one vector per slice, ``(D, embed_dim)``) is added to every slice's patch
  tokens by a forward hook on the ViT's patch embedding (the backbone's code is not touched). It starts at zero, so at
  initialisation each slice's features are exactly the 2-D backbone's.
* **``adapter3d`` in the blocks** (:mod:`medseg.adapters.adapter3d`: a depthwise 3-D convolution after every block,
  zero-initialised) mixes information across slices; the model runs the backbone inside
  :func:`~medseg.adapters.adapter3d.volume_depth` so the adapters know where one volume ends. The builder applies
  adapter3d by default (:data:`DEFAULT_ADAPTER`); ``adapter=None`` means full fine-tuning of an unchanged backbone,
  as for every other medseg builder, and then only the depth embedding and the decoder see across slices.
* **A 3-D prompt encoder** (:mod:`medseg.models.prompt_encoder_3d`) and **a multi-level 3-D decoder**
  (:mod:`medseg.models.volumetric_decoder`); besides SAM's tokens, the clicks, box and previous mask reach the
  decoder's full-resolution stage as maps (RITM), so that a correction click changes the voxels around it.

The interface is that of :class:`~medseg.models.promptable.PromptableSegmenter`, so the promptable training task and
the interactive evaluation drive both alike: :meth:`~VolumetricPromptableSegmenter.encode` runs the ViT once per
volume, :meth:`~VolumetricPromptableSegmenter.decode` turns the embedding plus one prompt set per volume into
``(logits (B, 1, X, Y, Z), iou (B, 1))``. There is always one mask (``M = 1``): ``multimask=True`` is accepted and
returns that one mask, since 3DSAM-adapter has no ambiguity heads.

Prompts follow :class:`~medseg.prompts.contract.Prompts` in voxels of the model input and array order:
``point_coords[..., a]`` indexes spatial axis ``a`` of the input (``(i, j, k)`` = ``(X, Y, Z)`` for MONAI patches),
``box`` is ``(i0, j0, k0, i1, j1, k1)`` inclusive, whatever ``slice_axis`` is. Volumes larger than ``roi_size`` go
through :func:`medseg.inference.volumetric.predict_prompted`.

Backbones: ``sam_vit_*`` and the timm ViTs ``dinov2_*`` / ``mae_*``. LiteMedSAM's TinyViT is not supported: it runs at
256 x 256 pixels only, has no single patch embedding of tokens (its first stage is convolutional) and a
hierarchical pyramid that the slice-wise depth embedding and this decoder do not model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.adapters.adapter3d import volume_depth
from medseg.backbones.base import Backbone
from medseg.backbones.registry import create_backbone, get_entry
from medseg.errors import ConfigError, InputShapeError
from medseg.models.dense import default_unetr_layers
from medseg.models.prompt_encoder_3d import PromptEncoder3d
from medseg.models.segmenter import apply_adapter_config
from medseg.models.volumetric_decoder import VolumetricMaskDecoder
from medseg.prompts.contract import Prompts

__all__ = [
    "DEFAULT_ADAPTER",
    "SUPPORTED_FAMILIES",
    "DepthPositionEmbedding",
    "VolumeEmbeddings",
    "VolumetricPromptableSegmenter",
    "build_volumetric_promptable",
]

SUPPORTED_FAMILIES = ("sam", "dinov2", "mae")
#: The adapter the builder applies when none is given: 3DSAM-adapter's (``conf/adapter/adapter3d.yaml``).
DEFAULT_ADAPTER: Mapping[str, Any] = MappingProxyType({"method": "adapter3d", "bottleneck": 64, "kernel_size": 3})
_INPUT_RANGES = ("unit", "minmax", "zscore")
_PATCH_SIZES = {"sam": 16, "dinov2": 14, "mae": 16}  # pixels, for the default roi


class DepthPositionEmbedding(nn.Module):
    """One learned vector per slice, added to that slice's patch tokens; zero at initialisation.

    It acts only while :attr:`depth` is set (inside :meth:`VolumetricPromptableSegmenter.encode`), so the backbone
    behaves as a plain 2-D model everywhere else. A volume of another depth than the table's resamples the table
    linearly along the slices.

    Args:
        depth: slices of the model input (the roi's size along the slice axis).
        dim: channels of the patch tokens.
    """

    def __init__(self, depth: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(depth, dim))
        self.depth: int | None = None

    def table(self, depth: int) -> torch.Tensor:
        """``(depth, dim)`` embeddings for a volume of ``depth`` slices."""
        if depth == self.embedding.shape[0]:
            return self.embedding
        resized = F.interpolate(self.embedding.t()[None], size=depth, mode="linear", align_corners=False)
        return resized[0].t()

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the patch embedding: ``(B * D, h, w, C)`` tokens + the embedding of each one's slice."""
        if self.depth is None:
            return None
        if output.ndim != 4 or output.shape[0] % self.depth:
            raise InputShapeError(
                f"depth embedding: patch tokens {tuple(output.shape)} are not (B * {self.depth}, h, w, C) slices."
            )
        table = self.table(self.depth).to(output.dtype).repeat(output.shape[0] // self.depth, 1)
        return output + table[:, None, None, :]


def _patch_embedding(backbone: Backbone) -> nn.Module:
    """The module whose output is the ``(B, h, w, C)`` patch tokens (SAM's ``patch_embed``, timm's with NHWC out)."""
    for owner in ("image_encoder", "vit"):
        if hasattr(backbone, owner) and hasattr(getattr(backbone, owner), "patch_embed"):
            return getattr(backbone, owner).patch_embed
    raise ConfigError(
        f"{type(backbone).__name__} has no ViT patch embedding; the volumetric model supports the families "
        f"{', '.join(SUPPORTED_FAMILIES)} (sam_vit_*, dinov2_*, mae_*)."
    )


@dataclass
class VolumeEmbeddings:
    """What :meth:`VolumetricPromptableSegmenter.encode` gives :meth:`~VolumetricPromptableSegmenter.decode`.

    Attributes:
        levels: ViT feature maps ``(B, c_l, *grid)`` in the input's array order, shallow to deep (the grid is the
            input size divided by the patch size in plane, full size along the slice axis).
        image: the model input ``(B, C, X, Y, Z)`` with intensities mapped to [0, 1] (for the decoder's stem).
    """

    levels: list[torch.Tensor]
    image: torch.Tensor

    @property
    def batch_size(self) -> int:
        """Volumes encoded."""
        return int(self.image.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the features are (as ``Tensor.device`` for the 2-D model's embeddings)."""
        return self.image.device

    def expand(self, batch: int) -> VolumeEmbeddings:
        """The embedding of one volume repeated for ``batch`` prompt sets (several objects in one volume)."""
        if self.batch_size != 1:
            raise InputShapeError(f"only the embedding of one volume can be expanded, this one holds {self.batch_size}")
        return replace(
            self,
            levels=[x.expand(batch, *x.shape[1:]) for x in self.levels],
            image=self.image.expand(batch, -1, -1, -1, -1),
        )

    def to(self, device: torch.device | str) -> VolumeEmbeddings:
        return replace(self, levels=[x.to(device) for x in self.levels], image=self.image.to(device))


class VolumetricPromptableSegmenter(nn.Module):
    """2-D ViT (+ depth embedding, adapter3d) + 3-D prompt encoder + multi-level 3-D mask decoder.

    Attributes:
        backbone: the 2-D :class:`~medseg.backbones.base.Backbone`, adapters inside.
        depth_embedding: :class:`DepthPositionEmbedding`, hooked onto the backbone's patch embedding.
        prompt_encoder: :class:`~medseg.models.prompt_encoder_3d.PromptEncoder3d`.
        mask_decoder: :class:`~medseg.models.volumetric_decoder.VolumetricMaskDecoder`.
        roi_size: ``(X, Y, Z)`` model-input size in voxels (the training patch and the sliding window).
        image_size: in-plane side of ``roi_size`` (pixels), as the 2-D model's attribute.
        slice_axis: spatial axis the ViT slices along.
        layers: backbone blocks whose outputs are the decoder's skip levels (the final features are the deepest).
        input_range: ``unit``/``minmax`` ([0, 1] input) or ``zscore`` (``z -> z / 6 + 0.5`` first).
        adapter_names: backbone parameters trained by adapter methods.
        click_radius: radius in voxels of the click disks of the decoder's prompt maps.
    """

    spatial_dims = 3

    def __init__(
        self,
        backbone: Backbone,
        roi_size: Sequence[int],
        slice_axis: int = 2,
        layers: Sequence[int] | None = None,
        decoder_dim: int = 256,
        num_heads: int = 8,
        input_range: str = "unit",
        adapter_names: set[str] | frozenset[str] = frozenset(),
        click_radius: float = 2.0,
    ) -> None:
        super().__init__()
        if input_range not in _INPUT_RANGES:
            raise ConfigError(f"input_range must be one of {_INPUT_RANGES}, got {input_range!r}")
        if slice_axis not in (0, 1, 2):
            raise ConfigError(f"slice_axis must be 0, 1 or 2 (a spatial axis of (C, X, Y, Z)), got {slice_axis}.")
        roi = tuple(int(r) for r in roi_size)
        patch = backbone.patch_size
        plane = [r for axis, r in enumerate(roi) if axis != slice_axis]
        if len(roi) != 3 or any(r % patch for r in plane):
            raise ConfigError(
                f"roi_size {list(roi_size)} must be 3 sizes in voxels whose in-plane sides (all but slice_axis "
                f"{slice_axis}) are multiples of {backbone.name!r}'s {patch} px patch, e.g. "
                f"{[max(patch, r // patch * patch) if a != slice_axis else r for a, r in enumerate(roi)]}."
            )
        self.backbone = backbone
        self.roi_size, self.slice_axis, self.input_range = roi, slice_axis, input_range
        self.image_size = max(plane)
        self.layers = list(default_unetr_layers(backbone, 3) if layers is None else layers)
        self.adapter_names = set(adapter_names)
        self.depth_embedding = DepthPositionEmbedding(roi[slice_axis], backbone.block_dim)
        _patch_embedding(backbone).register_forward_hook(self.depth_embedding.hook)
        self.prompt_encoder = PromptEncoder3d(decoder_dim, slice_axis, click_radius=click_radius)
        level_dims = [backbone.block_dim] * len(self.layers) + [backbone.embed_dim]
        self.mask_decoder = VolumetricMaskDecoder(
            level_dims, self.in_channels, patch, decoder_dim, slice_axis, num_heads=num_heads
        )

    @property
    def in_channels(self) -> int:
        """Image channels :meth:`encode` takes (the backbone's channel adapter maps them onto its stem)."""
        return self.backbone.channel_adapter.in_channels

    def encoder_modules(self) -> dict[str, nn.Module]:
        """The modules an embedding depends on (hashed by :func:`medseg.inference.cache.weights_hash`)."""
        return {"backbone": self.backbone, "depth_embedding": self.depth_embedding}

    def _check_volume(self, volumes: torch.Tensor) -> None:
        patch = self.backbone.patch_size
        plane = [s for axis, s in enumerate(volumes.shape[2:]) if axis != self.slice_axis]
        if volumes.ndim != 5 or volumes.shape[1] != self.in_channels or any(s % patch for s in plane):
            raise InputShapeError(
                f"encode takes (B, {self.in_channels}, X, Y, Z) volumes whose in-plane sides (all spatial axes but "
                f"slice_axis {self.slice_axis}) are multiples of {patch} voxels, got {tuple(volumes.shape)}; the "
                f"model's roi_size is {list(self.roi_size)}: crop or slide windows of that size "
                f"(medseg.inference.volumetric.predict_prompted)."
            )

    def encode(self, volumes: torch.Tensor) -> VolumeEmbeddings:
        """ViT features of a batch of volumes in model-input space.

        Args:
            volumes: ``(B, C, X, Y, Z)`` voxels, intensities as ``input_range`` says; in-plane sides multiples of the
                patch size (``roi_size`` in training and sliding-window inference).

        Returns:
            :class:`VolumeEmbeddings`: feature maps ``(B, c, *grid)`` with ``grid`` the size divided by the patch in
            plane and the full number of slices along ``slice_axis``.
        """
        self._check_volume(volumes)
        x = volumes / 6.0 + 0.5 if self.input_range == "zscore" else volumes
        batch, channels = x.shape[:2]
        slices = x.movedim(2 + self.slice_axis, 1)  # (B, D, C, H, W)
        depth, plane = slices.shape[1], slices.shape[3:]
        slices = slices.reshape(batch * depth, channels, *plane)
        self.depth_embedding.depth = depth
        try:
            with volume_depth(self.backbone, depth):
                output = self.backbone(self.backbone.normalise(slices), layers=self.layers)
        finally:
            self.depth_embedding.depth = None
        levels = []
        for features in [*output.intermediates, output.features]:  # (B * D, c, h, w) each
            grid = features.reshape(batch, depth, *features.shape[1:]).transpose(1, 2)  # (B, c, D, h, w)
            levels.append(grid.movedim(2, 2 + self.slice_axis))
        return VolumeEmbeddings(levels=levels, image=x)

    def decode(
        self, embeddings: VolumeEmbeddings, prompts: Prompts, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per prompt set and volume.

        Args:
            embeddings: from :meth:`encode` (one volume per prompt set; see :meth:`VolumeEmbeddings.expand`).
            prompts: 3-D :class:`~medseg.prompts.contract.Prompts` with batch ``B``, in model-input voxels.
            multimask: accepted for the 2-D model's interface; the 3-D model has one output mask either way.

        Returns:
            ``(logits (B, 1, X, Y, Z), iou (B, 1))``: mask logits at the model-input size and the predicted IoU.
        """
        if prompts.batch_size != embeddings.batch_size:
            raise InputShapeError(f"{prompts.batch_size} prompt sets for {embeddings.batch_size} volume embeddings.")
        size, grid = tuple(embeddings.image.shape[2:]), tuple(embeddings.levels[-1].shape[2:])
        if prompts.prev_mask is not None and tuple(prompts.prev_mask.shape[2:]) != size:
            raise InputShapeError(f"prev_mask {tuple(prompts.prev_mask.shape)} is not at the model-input size {size}.")
        sparse, dense = self.prompt_encoder(prompts, size, grid)
        dense_pe = self.prompt_encoder.dense_pe(grid)
        maps = self.prompt_encoder.maps(prompts, size)
        return self.mask_decoder(embeddings.levels, embeddings.image, sparse, dense, dense_pe, maps)

    def forward(
        self, volumes: torch.Tensor, prompts: Prompts, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode(encode(volumes), prompts)``: logits ``(B, 1, X, Y, Z)`` and predicted IoU ``(B, 1)``."""
        return self.decode(self.encode(volumes), prompts, multimask)


def _default_roi(patch: int, slice_axis: int) -> list[int]:
    """8 x 8 patches in plane (SAM/MAE 128 px, DINOv2 112 px) and 32 slices."""
    return [32 if axis == slice_axis else 8 * patch for axis in range(3)]


def build_volumetric_promptable(
    backbone: str,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    in_channels: int = 1,
    adapter: Any = DEFAULT_ADAPTER,
    img_size: int | None = None,
    *,
    roi_size: Sequence[int] | None = None,
    slice_axis: int = 2,
    layers: Sequence[int] | None = None,
    decoder_dim: int = 256,
    num_heads: int = 8,
    input_range: str = "unit",
    channel_mode: str = "repeat",
    arch: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    attention: str = "fused",
    grad_checkpointing: bool | int | str = False,
    click_radius: float = 2.0,
) -> VolumetricPromptableSegmenter:
    """Build a volumetric promptable model; ``pretrained`` (the ``init`` switch) changes the ViT's weights only.

    The depth embedding, adapters, prompt encoder and decoder are new modules (standard initialisation; the depth
    embedding and adapter3d's up-projections at zero) for both ``init`` values, so the pretrained model and its scratch
    twin differ in the ViT's initial weights alone.

    Args:
        backbone: registry name: ``sam_vit_b/l/h``, ``dinov2_*`` or ``mae_*``.
        pretrained: official ViT weights; ``False`` is the scratch twin.
        checkpoint: explicit checkpoint of the backbone.
        in_channels: image channels (mapped onto RGB by ``channel_mode``).
        adapter: an ``AdapterConfig``, a mapping of its arguments, or ``None`` (no adapter: everything trains). The
            default is :data:`DEFAULT_ADAPTER`, 3DSAM-adapter's adapter3d.
        img_size: accepted for the 2-D builders' signature (``backbone.img_size`` of the configs); if given, it must
            equal the in-plane side of ``roi_size``. The ViT is built for the in-plane roi.
        roi_size: ``[X, Y, Z]`` model-input size in voxels; in-plane sides multiples of the patch size. Default: 8
            patches in plane (SAM/MAE 128, DINOv2 112) and 32 slices along ``slice_axis``.
        slice_axis: spatial axis (0, 1, 2 of ``(C, X, Y, Z)``) the ViT cuts slices along; 2 = axial after RAS.
        layers: ViT blocks used as skip levels; default three evenly spaced ones (``N/4 - 1, N/2 - 1, 3N/4 - 1``).
        decoder_dim: channels of the prompt tokens and the decoder's token grid (SAM: 256).
        num_heads: attention heads of the decoder's two-way transformer.
        input_range: ``unit``/``minmax`` or ``zscore``.
        channel_mode: ``repeat`` or ``project``.
        arch: architecture overrides for tiny test models.
        num_classes: accepted so the training code can pass the data module's values to every builder alike; a
            promptable model segments one object per prompt set.
        attention: ``fused`` (default) or ``reference`` ViT attention (``backbone.attention``).
        grad_checkpointing: ViT activation checkpointing, ``none``/``all``/every ``k``-th block
            (``backbone.activation_checkpointing``); the adapter3d volume depth is replayed on recomputation.
        click_radius: radius (voxels of the model input) of the click disks that the decoder's full-resolution
            stem reads (:meth:`~medseg.models.prompt_encoder_3d.PromptEncoder3d.maps`).

    Raises:
        ConfigError: an unsupported backbone (LiteMedSAM), a bad roi or decoder setting.
    """
    family = get_entry(backbone).family
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"the volumetric promptable model needs a plain ViT backbone (sam_vit_b/l/h, dinov2_*, mae_*); "
            f"{backbone!r} is a {family} backbone. For LiteMedSAM on volumes use slice propagation "
            f"(medseg.inference.propagate) with model=promptable_2d."
        )
    kwargs: dict[str, Any] = {"in_channels": in_channels, "channel_mode": channel_mode}
    if arch is not None:
        kwargs["arch"] = arch
    if roi_size is None:
        patch = _PATCH_SIZES[family]
        roi = _default_roi(patch, slice_axis) if img_size is None else [img_size] * 3
        roi[slice_axis] = 32
    else:
        roi = [int(r) for r in roi_size]
    if len(roi) != 3:
        raise ConfigError(f"roi_size needs 3 sizes in voxels [X, Y, Z], got {roi_size}.")
    plane = max(r for axis, r in enumerate(roi) if axis != slice_axis)
    if img_size is not None and int(img_size) != plane:
        raise ConfigError(
            f"img_size {img_size} differs from roi_size {roi} in plane; the volumetric model's input is roi_size "
            f"(set img_size to null or to {plane})."
        )
    kwargs["img_size"] = plane  # SAM builds its encoder for it; DINOv2/MAE resample position embeddings to it
    net = create_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    net.set_attention(attention)
    net.set_activation_checkpointing(grad_checkpointing)
    adapter_names = apply_adapter_config(net, adapter)
    return VolumetricPromptableSegmenter(
        net,
        roi,
        slice_axis,
        layers,
        decoder_dim,
        num_heads,
        input_range=input_range,
        adapter_names=adapter_names,
        click_radius=click_radius,
    )
