"""Prompt-free multi-class decoders for 2-D backbones: ``linear`` and ``unetr`` (``sam_mask`` is in ``sam_mask.py``).

Every decoder has the same small interface, used by :class:`~medseg.models.segmenter.Segmenter`:

* ``layers``: the backbone blocks whose outputs it needs (passed to ``Backbone.forward(x, layers=...)``);
* ``forward(output, image) -> logits (B, K, H, W)`` with ``output`` the :class:`~medseg.backbones.BackboneOutput` and
  ``image`` the normalised backbone input ``(B, C, H, W)`` (pixels), whose size the logits take.

``unetr`` follows UNETR (Hatamizadeh et al. 2022) with MONAI's own blocks: a convolution stem on the image at full
resolution, block outputs brought up to coarser-to-finer stages by transposed convolutions, and a decoder that doubles
the resolution at each stage and concatenates the skip. It works for the plain ViTs (every block at the patch stride:
the skips are spread over the stages, as UNETR does with blocks 3, 6, 9) and for LiteMedSAM's hierarchical TinyViT
(blocks at strides 1, 2 and 4 px: each skip goes to the stage of its own stride, with no upsampling).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetResBlock, UnetrPrUpBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

from medseg.backbones.base import Backbone, BackboneOutput
from medseg.errors import ConfigError

__all__ = ["LinearDecoder", "UNETRDecoder", "block_strides", "default_unetr_layers"]


def block_strides(backbone: Backbone) -> list[int]:
    """Stride in input pixels of every block output: the patch size for plain ViTs, per stage for TinyViT."""
    strides = getattr(backbone, "block_strides", None)
    return list(strides) if strides else [backbone.patch_size] * backbone.num_blocks


def block_dims(backbone: Backbone) -> list[int]:
    """Channels of every block output (``block_dims`` for TinyViT, else ``block_dim`` everywhere)."""
    dims = getattr(backbone, "block_dims", None)
    return list(dims) if dims else [backbone.block_dim] * backbone.num_blocks


def default_unetr_layers(backbone: Backbone, num_skips: int = 3) -> list[int]:
    """Blocks whose outputs feed the UNETR skips (the final feature map is the bottleneck).

    Plain ViT of ``N`` blocks: ``num_skips`` evenly spaced blocks ``N/4 - 1, N/2 - 1, 3N/4 - 1`` (UNETR's 3, 6, 9
    of 12). Hierarchical backbone (strides or widths change between blocks): the last block of every stage but the
    final one, whose output the neck turns into the features (LiteMedSAM: blocks 1, 3 and 9).
    """
    strides, dims = block_strides(backbone), block_dims(backbone)
    n = backbone.num_blocks
    if len(set(zip(strides, dims))) > 1:
        ends = [i for i in range(n - 1) if (strides[i], dims[i]) != (strides[i + 1], dims[i + 1])]
        return ends
    return [(i + 1) * n // (num_skips + 1) - 1 for i in range(num_skips)]


class LinearDecoder(nn.Module):
    """A linear probe: (BatchNorm +) 1x1 convolution on the final feature map, bilinearly upsampled to the input.

    This is DINOv2's linear segmentation head; it measures how linearly separable the classes are in the backbone's
    features at the patch resolution, so it is the fairest read-out of a frozen backbone, not a strong segmenter.
    """

    layers: tuple[int, ...] = ()

    def __init__(self, embed_dim: int, num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(embed_dim) if batch_norm else nn.Identity()
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, output: BackboneOutput, image: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.norm(output.features))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


class _UpBlock(nn.Module):
    """UNETR's up block (MONAI ``UnetrUpBlock``: transposed convolution, concatenation, residual block), which also
    resizes the upsampled map to the skip when the patch size is not a power of 2, and runs without a skip."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int, norm_name: str | tuple) -> None:
        super().__init__()
        self.transp_conv = get_conv_layer(
            2, in_channels, out_channels, kernel_size=2, stride=2, conv_only=True, is_transposed=True
        )
        self.conv_block = UnetResBlock(2, out_channels + skip_channels, out_channels, 3, 1, norm_name=norm_name)

    def forward(self, inp: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        out = self.transp_conv(inp)
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return self.conv_block(out if skip is None else torch.cat((out, skip), dim=1))


class UNETRDecoder(nn.Module):
    """UNETR-style decoder over block outputs of a 2-D backbone, with a skip from the input image.

    Stages ``k = 0..K`` have stride ``2**k`` pixels and ``feature_size * 2**k`` channels, with ``K = log2`` of the
    feature map's stride (4 for 16 px patches; DINOv2's 14 px counts as 16 and maps are resized to the exact stage
    sizes). The bottleneck is ``BackboneOutput.features`` (SAM and TinyViT: after the neck; timm ViT: after the final
    norm), so every backbone parameter is used. Skip ``j`` goes to stage ``min(log2(stride_j), j + 1)`` through
    ``log2(stride_j) - stage`` transposed convolutions (MONAI ``UnetrPrUpBlock``).

    Args:
        in_channels: channels of the image the backbone receives (the stem skip).
        features_dim: channels of ``BackboneOutput.features``.
        features_stride: stride in pixels of the features.
        skip_dims, skip_strides: channels and strides (pixels) of the selected block outputs, shallow first.
        layers: the block indices of those outputs.
        num_classes: output channels, background included.
        feature_size: channels of stage 0 (UNETR's ``feature_size``).
        norm_name: MONAI norm of the convolution blocks.
    """

    def __init__(
        self,
        in_channels: int,
        features_dim: int,
        features_stride: int,
        skip_dims: Sequence[int],
        skip_strides: Sequence[int],
        layers: Sequence[int],
        num_classes: int,
        feature_size: int = 32,
        norm_name: str | tuple = "instance",
    ) -> None:
        super().__init__()
        self.layers = tuple(layers)
        depth = round(math.log2(features_stride))
        if depth < 1 or len(skip_dims) != len(skip_strides) or len(skip_dims) != len(self.layers):
            raise ConfigError(
                f"unetr: needs a feature stride of at least 2 px and one (dim, stride) per layer; got stride "
                f"{features_stride}, {len(skip_dims)} dims, {len(skip_strides)} strides, {len(self.layers)} layers"
            )
        self.depth = depth
        width = [feature_size * 2**k for k in range(depth + 1)]
        self.stages: list[int] = []
        skips = []
        for j, (dim, stride) in enumerate(zip(skip_dims, skip_strides)):
            native = round(math.log2(stride))
            stage = min(native, j + 1, depth)
            ups = native - stage
            if ups > 0:
                block = UnetrPrUpBlock(
                    2, dim, width[stage], ups - 1, 3, 1, 2, norm_name, conv_block=True, res_block=True
                )
            else:
                block = UnetrBasicBlock(2, dim, width[stage], 3, 1, norm_name, res_block=True)
            self.stages.append(stage)
            skips.append(block)
        self.skips = nn.ModuleList(skips)
        self.stem = UnetrBasicBlock(2, in_channels, width[0], 3, 1, norm_name, res_block=True)
        # channels concatenated at each stage: the skips that land there (plus the image stem at stage 0)
        skip_channels = [width[k] * (self.stages.count(k) + (k == 0)) for k in range(depth + 1)]
        self.bottleneck = (
            UnetrBasicBlock(2, features_dim + skip_channels[depth], width[depth], 3, 1, norm_name, res_block=True)
            if skip_channels[depth]
            else nn.Identity()
        )
        bottom = width[depth] if skip_channels[depth] else features_dim
        ups = []
        for k in range(depth - 1, -1, -1):
            in_ch = bottom if k == depth - 1 else width[k + 1]
            ups.append(_UpBlock(in_ch, width[k], skip_channels[k], norm_name))
        self.ups = nn.ModuleList(ups)
        self.head = UnetOutBlock(2, width[0], num_classes)

    @classmethod
    def for_backbone(
        cls,
        backbone: Backbone,
        in_channels: int,
        num_classes: int,
        layers: Sequence[int] | None = None,
        feature_size: int = 32,
        norm_name: str | tuple = "instance",
    ) -> UNETRDecoder:
        """Decoder wired to ``backbone``'s block widths and strides (``layers=None``: :func:`default_unetr_layers`)."""
        layers = list(default_unetr_layers(backbone) if layers is None else layers)
        layers = [i % backbone.num_blocks for i in layers]
        strides, dims = block_strides(backbone), block_dims(backbone)
        if any(strides[a] > strides[b] for a, b in itertools.pairwise(layers)):
            raise ConfigError(f"unetr: layers {layers} must go from shallow to deep (block strides {strides})")
        return cls(
            in_channels=in_channels,
            features_dim=backbone.embed_dim,
            features_stride=backbone.patch_size,
            skip_dims=[dims[i] for i in layers],
            skip_strides=[strides[i] for i in layers],
            layers=layers,
            num_classes=num_classes,
            feature_size=feature_size,
            norm_name=norm_name,
        )

    def forward(self, output: BackboneOutput, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        sizes = [(math.ceil(height / 2**k), math.ceil(width / 2**k)) for k in range(self.depth)]
        sizes.append(tuple(output.features.shape[-2:]))
        at_stage: list[list[torch.Tensor]] = [[] for _ in range(self.depth + 1)]
        at_stage[0].append(self.stem(image))
        for block, stage, hidden in zip(self.skips, self.stages, output.intermediates):
            out = block(hidden)
            if tuple(out.shape[-2:]) != sizes[stage]:
                out = F.interpolate(out, size=sizes[stage], mode="bilinear", align_corners=False)
            at_stage[stage].append(out)
        x = output.features
        if at_stage[self.depth]:
            x = self.bottleneck(torch.cat([x, *at_stage[self.depth]], dim=1))
        for up, k in zip(self.ups, range(self.depth - 1, -1, -1)):
            x = up(x, torch.cat(at_stage[k], dim=1) if at_stage[k] else None, sizes[k])
        return self.head(x)
