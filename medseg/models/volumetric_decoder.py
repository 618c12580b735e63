"""Multi-level 3-D mask decoder of the volumetric promptable model (3DSAM-adapter style, SAM's decoding recipe).

From coarse to fine:

1. **Prompt fusion at the token grid.** The deepest feature map (the ViT's output, one cell per patch in plane and per
   slice along the slice axis) is projected to ``dim`` channels, the dense prompt embedding is added, and SAM's own
   two-way transformer (``segment_anything``'s ``TwoWayTransformer``, which only needs flattened tokens) lets an IoU
   token, a mask token and the prompt tokens attend to the image tokens and back.
2. **Upsampling with skips.** ``ceil(log2(patch))`` stages bring the prompt-aware grid to the model-input size in
   plane (each stage about doubles it; a 14 px DINOv2 patch works as well as SAM's 16 px one). Stage ``s`` concatenates
   a skip: the earlier ViT blocks, deepest first (as UNETR places blocks 9, 6, 3), each projected by a 1x1x1
   convolution and resized to the stage, and at full resolution a convolution stem on the input volume itself and
   the full-resolution prompt maps (previous mask, click disks, box: :meth:`~medseg.models.prompt_encoder_3d.
   PromptEncoder3d.maps`), so that a click or the previous mask acts at the voxels it concerns, not only through the
   coarse token grid. Each stage is a MONAI ``UnetResBlock`` (3x3x3 convolutions, instance norm).
3. **Tokens modulate the dense features.** As in SAM, an MLP maps the mask token to one weight per channel of the
   full-resolution features and the mask logits are their weighted sum; another MLP maps the IoU token to the
   predicted IoU of that mask.

One mask per prompt set: 3DSAM-adapter has no multi-mask output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetResBlock
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from medseg.errors import ConfigError
from medseg.models.prompt_encoder_3d import MAP_CHANNELS, ChannelNorm3d

__all__ = ["VolumetricMaskDecoder", "stage_sizes"]


def stage_sizes(grid: Sequence[int], size: Sequence[int], stages: int, slice_axis: int) -> list[tuple[int, ...]]:
    """Spatial size of every upsampling stage, in voxels: halving back from ``size`` in plane, never below ``grid``.

    The slice axis is at full resolution in the grid already and keeps its size.
    """
    out = []
    for stage in range(1, stages + 1):
        factor = 2 ** (stages - stage)
        out.append(
            tuple(
                int(s) if axis == slice_axis else max(int(g), round(s / factor))
                for axis, (g, s) in enumerate(zip(grid, size))
            )
        )
    return out


class VolumetricMaskDecoder(nn.Module):
    """Prompt fusion, multi-level upsampling and the mask/IoU heads (see the module docstring).

    Args:
        level_dims: channels of the encoder's feature maps, shallow to deep; the last one is fused with the prompts,
            the others are skips.
        in_channels: channels of the input volume (for the full-resolution stem, which also reads the
            :data:`~medseg.models.prompt_encoder_3d.MAP_CHANNELS` prompt maps).
        patch_size: in-plane pixels per token (sets the number of upsampling stages).
        dim: channels of the prompt tokens and of the fused grid.
        slice_axis: spatial axis that is not downsampled by the encoder.
        num_heads: attention heads of the two-way transformer (``dim / 2`` must be divisible by it).
        transformer_depth: two-way attention blocks (SAM: 2).
        min_channels: narrowest upsampling stage.

    Raises:
        ConfigError: more skip levels than stages to take them, or heads that do not divide the width.
    """

    def __init__(
        self,
        level_dims: Sequence[int],
        in_channels: int,
        patch_size: int,
        dim: int = 256,
        slice_axis: int = 2,
        num_heads: int = 8,
        transformer_depth: int = 2,
        min_channels: int = 8,
    ) -> None:
        super().__init__()
        self.stages = max(1, math.ceil(math.log2(patch_size)))
        skips = list(reversed(level_dims[:-1]))  # deepest first
        if len(skips) > self.stages - 1:
            raise ConfigError(
                f"the decoder has {self.stages} upsampling stages for a {patch_size} px patch and takes at most "
                f"{self.stages - 1} skip levels, got {len(skips)}; set model.layers to fewer blocks."
            )
        if dim % 2 or (dim // 2) % num_heads:
            raise ConfigError(
                f"decoder_dim {dim} must be even and dim / 2 divisible by num_heads {num_heads} (SAM's attention "
                f"downsamples the cross-attention by 2)."
            )
        self.slice_axis = slice_axis
        self.embed_proj = nn.Sequential(nn.Conv3d(level_dims[-1], dim, kernel_size=1, bias=False), ChannelNorm3d(dim))
        self.transformer = TwoWayTransformer(
            depth=transformer_depth, embedding_dim=dim, num_heads=num_heads, mlp_dim=8 * dim
        )
        self.iou_token = nn.Embedding(1, dim)
        self.mask_token = nn.Embedding(1, dim)
        channels = [dim] + [max(dim // 2**s, min_channels) for s in range(1, self.stages + 1)]
        self.skip_proj = nn.ModuleList(nn.Conv3d(c, channels[i + 1], kernel_size=1) for i, c in enumerate(skips))
        self.stem = UnetResBlock(
            3, in_channels + MAP_CHANNELS, channels[-1], kernel_size=3, stride=1, norm_name="instance"
        )
        blocks = []
        for stage in range(1, self.stages + 1):
            has_skip = stage <= len(skips) or stage == self.stages
            width = channels[stage - 1] + (channels[stage] if has_skip else 0)
            blocks.append(UnetResBlock(3, width, channels[stage], kernel_size=3, stride=1, norm_name="instance"))
        self.blocks = nn.ModuleList(blocks)
        self.hyper_mlp = MLP(dim, dim, channels[-1], 3)
        self.iou_head = MLP(dim, dim, 1, 3)

    def forward(
        self,
        levels: Sequence[torch.Tensor],
        image: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        dense_pe: torch.Tensor,
        maps: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits and predicted IoU of one prompt set per volume.

        Args:
            levels: encoder feature maps ``(B, c_l, *grid)``, shallow to deep.
            image: the model input ``(B, C, *size)`` (voxels), for the full-resolution stem.
            sparse: prompt tokens ``(B, N, dim)``.
            dense: dense prompt embedding ``(B, dim, *grid)``.
            dense_pe: positional codes of the grid ``(1, dim, *grid)``.
            maps: full-resolution prompt maps ``(B, MAP_CHANNELS, *size)``.

        Returns:
            ``(logits (B, 1, *size), iou (B, 1))``.
        """
        batch = image.shape[0]
        grid, size = tuple(levels[-1].shape[2:]), tuple(image.shape[2:])
        src = self.embed_proj(levels[-1]) + dense
        pos = dense_pe.expand(batch, -1, *grid)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_token.weight]).expand(batch, -1, -1)
        tokens = torch.cat([output_tokens, sparse.to(output_tokens.dtype)], dim=1)
        # TwoWayTransformer unpacks (B, C, h, w): hand it the grid flattened to (B, C, cells, 1)
        hs, keys = self.transformer(src.flatten(2)[..., None], pos.flatten(2)[..., None], tokens)
        x = keys.transpose(1, 2).reshape(batch, -1, *grid)
        skips = list(reversed(levels[:-1]))
        for index, (block, target) in enumerate(
            zip(self.blocks, stage_sizes(grid, size, self.stages, self.slice_axis))
        ):
            x = F.interpolate(x, size=target, mode="trilinear", align_corners=False)
            if index < len(skips):
                skip = F.interpolate(self.skip_proj[index](skips[index]), size=target, mode="trilinear")
                x = torch.cat([x, skip], dim=1)
            elif index == self.stages - 1:
                x = torch.cat([x, self.stem(torch.cat([image, maps.to(image.dtype)], dim=1))], dim=1)
            x = block(x)
        weights = self.hyper_mlp(hs[:, 1])  # (B, c)
        logits = torch.einsum("bc,bc...->b...", weights, x)[:, None]
        return logits, self.iou_head(hs[:, 0])
