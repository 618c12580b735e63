"""3-D prompt encoder: SAM's prompt encoder lifted to volumes (points, boxes and a previous mask in voxels).

What it does is SAM's ``PromptEncoder`` with one more coordinate, as in 3DSAM-adapter (Gong et al. 2024):

* **Positions** are random Fourier features (SAM's ``PositionEmbeddingRandom``) of three coordinates. A voxel index
  ``c`` on an axis of ``n`` voxels is normalised to ``(c + 0.5) / n`` (integer coordinates are voxel centres, as the
  prompt contract says), so a point and the cell of the dense grid that contains it get the same code, whatever the
  grid's resolution.
* **Points** add a learned embedding for negative (label 0) and positive (label 1) clicks; padding (label -1) gets
  only the learned "not a point" embedding, so where a padded point lies does not matter.
* **Boxes** are two points, the inclusive corners ``(i0, j0, k0)`` and ``(i1, j1, k1)``, each with its own embedding.
* **A previous mask** (``prev_mask``) is resized to four times the embedding grid in plane and reduced by two strided
  3-D convolutions (SAM's ``mask_downscaling``; stride 1 along the slice axis, which the grid keeps at full
  resolution); without one, a learned "no mask" embedding fills the dense grid.

* **Prompt maps at full resolution** (:meth:`PromptEncoder3d.maps`), as RITM (Sofiiuk et al. 2022, "Reviving
  iterative training with mask guidance for interactive segmentation") feeds its network: the previous mask as a
  probability, a disk of ``click_radius`` voxels around every positive and every negative click, and the box's inside,
  four ``(B, 4, X, Y, Z)`` channels that the decoder's full-resolution stem reads with the image. The tokens above
  reach the image only on the embedding grid (one cell per 16 px patch in plane: 2 x 2 cells for a 32 px roi), so
  without these maps a negative click could only switch off a whole patch and the previous mask could not be kept at
  its own resolution: clicks made a tiny model worse.

Coordinates are in voxels of the model input, in array order (``point_coords[..., a]`` indexes spatial axis ``a`` of
the ``(B, C, X, Y, Z)`` input), exactly as :mod:`medseg.prompts.contract` defines them; nothing is flipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError, InputShapeError
from medseg.prompts.contract import Prompts

__all__ = ["MAP_CHANNELS", "ChannelNorm3d", "PositionEmbeddingRandom3d", "PromptEncoder3d", "mask_as_logits"]


MAP_CHANNELS = 4
"""Channels of :meth:`PromptEncoder3d.maps`: previous mask, positive clicks, negative clicks, box."""


def mask_as_logits(mask: torch.Tensor) -> torch.Tensor:
    """A previous mask as logits: one given as probabilities (all values in [0, 1]) is converted, logits pass."""
    if mask.min() >= 0 and mask.max() <= 1:
        mask = mask.clamp(1e-4, 1 - 1e-4)
        return torch.log(mask / (1 - mask))
    return mask


class ChannelNorm3d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, X, Y, Z)`` map at every voxel (SAM's ``LayerNorm2d`` in 3-D)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class PositionEmbeddingRandom3d(nn.Module):
    """Random Fourier features of 3-D positions normalised to [0, 1] (SAM's ``PositionEmbeddingRandom`` in 3-D).

    Args:
        num_pos_feats: frequencies; the code has ``2 * num_pos_feats`` channels (sine and cosine).
        scale: standard deviation of the Gaussian frequencies (SAM: 1).
    """

    def __init__(self, num_pos_feats: int, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("gaussian_matrix", scale * torch.randn(3, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``(..., 3)`` positions in [0, 1] -> ``(..., 2 * num_pos_feats)`` codes."""
        projected = 2 * math.pi * ((2 * coords - 1) @ self.gaussian_matrix)
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def forward(self, grid: Sequence[int]) -> torch.Tensor:
        """Codes of the cell centres of a ``grid`` (cells per axis) covering the volume: ``(C, *grid)``."""
        device = self.gaussian_matrix.device
        axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in grid]
        centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return self.encode(centres).movedim(-1, 0)

    def forward_with_coords(self, coords: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Codes of ``(B, N, 3)`` voxel coordinates of a volume of ``size`` voxels per axis: ``(B, N, C)``."""
        extent = torch.as_tensor([float(s) for s in size], device=coords.device)
        return self.encode((coords.float() + 0.5) / extent)


class PromptEncoder3d(nn.Module):
    """Sparse (points, box corners) and dense (previous mask) prompt embeddings for a 3-D image-embedding grid.

    Args:
        embed_dim: channels of the prompt tokens and of the image embedding (even).
        slice_axis: the spatial axis (0, 1 or 2) that the embedding grid keeps at full resolution.
        mask_channels: channels of the hidden layer of the mask downscaling (SAM: 16).
        click_radius: radius (voxels of the model input) of the disks of :meth:`maps` (RITM: 5 px at 320-480 px).
    """

    def __init__(self, embed_dim: int, slice_axis: int = 2, mask_channels: int = 16, click_radius: float = 2.0) -> None:
        super().__init__()
        if embed_dim % 2:
            raise ConfigError(f"the prompt embedding dimension must be even (sine + cosine), got {embed_dim}.")
        if not click_radius > 0:
            raise ConfigError(f"click_radius must be a positive number of voxels, got {click_radius}.")
        self.click_radius = float(click_radius)
        self.embed_dim = embed_dim
        self.slice_axis = slice_axis
        self.pe_layer = PositionEmbeddingRandom3d(embed_dim // 2)
        # 0 negative point, 1 positive point, 2 box corner (i0, j0, k0), 3 box corner (i1, j1, k1)
        self.point_embeddings = nn.Embedding(4, embed_dim)
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        stride = tuple(1 if axis == slice_axis else 2 for axis in range(3))
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_channels // 4, kernel_size=stride, stride=stride),
            ChannelNorm3d(mask_channels // 4),
            nn.GELU(),
            nn.Conv3d(mask_channels // 4, mask_channels, kernel_size=stride, stride=stride),
            ChannelNorm3d(mask_channels),
            nn.GELU(),
            nn.Conv3d(mask_channels, embed_dim, kernel_size=1),
        )

    def dense_pe(self, grid: Sequence[int]) -> torch.Tensor:
        """Positional codes of the embedding grid, ``(1, C, *grid)``."""
        return self.pe_layer(grid)[None]

    def sparse(self, prompts: Prompts, size: Sequence[int]) -> torch.Tensor:
        """Point and box-corner tokens ``(B, N + 2, C)`` (``N`` points, 2 corners; either may be absent).

        Args:
            prompts: 3-D prompts in voxels of the model input.
            size: spatial size of the model input in voxels, ``(X, Y, Z)``.
        """
        batch = prompts.batch_size
        weight = self.point_embeddings.weight
        tokens = [torch.empty(batch, 0, self.embed_dim, device=weight.device, dtype=weight.dtype)]
        if prompts.point_coords is not None:
            labels = prompts.point_labels.to(weight.device)
            codes = self.pe_layer.forward_with_coords(prompts.point_coords.to(weight.device), size)
            codes = torch.where((labels < 0)[..., None], torch.zeros_like(codes), codes)
            codes = codes + self.not_a_point_embed.weight * (labels < 0)[..., None]
            codes = codes + self.point_embeddings(labels.clamp(min=0, max=1)) * (labels >= 0)[..., None]
            tokens.append(codes)
        if prompts.box is not None:
            corners = prompts.box.to(weight.device).reshape(batch, 2, 3)
            tokens.append(self.pe_layer.forward_with_coords(corners, size) + weight[2:4])
        return torch.cat(tokens, dim=1)

    def dense(self, prompts: Prompts, grid: Sequence[int]) -> torch.Tensor:
        """Dense embedding ``(B, C, *grid)``: the previous mask's, or the "no mask" embedding everywhere."""
        if prompts.prev_mask is None:
            return self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(prompts.batch_size, -1, *grid)
        mask = mask_as_logits(prompts.prev_mask.to(self.no_mask_embed.weight.device).float())
        mask_size = [n if axis == self.slice_axis else 4 * n for axis, n in enumerate(grid)]
        if list(mask.shape[-3:]) != mask_size:
            mask = F.interpolate(mask, size=mask_size, mode="trilinear", align_corners=False)
        return self.mask_downscaling(mask)

    def maps(self, prompts: Prompts, size: Sequence[int]) -> torch.Tensor:
        """Full-resolution prompt maps ``(B, 4, *size)`` in [0, 1] (module docstring): previous mask probability (0
        without one), positive-click disks, negative-click disks (padding points draw nothing) and the box's inside."""
        device = self.no_mask_embed.weight.device
        out = torch.zeros(prompts.batch_size, MAP_CHANNELS, *size, device=device)
        if prompts.prev_mask is not None:
            out[:, 0] = torch.sigmoid(mask_as_logits(prompts.prev_mask.to(device).float())[:, 0])
        axes = [torch.arange(int(n), device=device, dtype=torch.float32) for n in size]
        if prompts.point_coords is not None:
            coords = prompts.point_coords.to(device).float()  # (B, N, 3)
            labels = prompts.point_labels.to(device)
            squared = sum(
                (axes[a].view(1, 1, *[-1 if d == a else 1 for d in range(3)]) - coords[..., a, None, None, None]) ** 2
                for a in range(3)
            )  # (B, N, *size)
            disk = squared <= self.click_radius**2
            for channel, label in ((1, 1), (2, 0)):
                out[:, channel] = (disk & (labels == label)[..., None, None, None]).any(1).float()
        if prompts.box is not None:
            box = prompts.box.to(device).float()  # (B, 6) inclusive
            inside = [
                (axes[a] >= box[:, a, None]) & (axes[a] <= box[:, 3 + a, None]) for a in range(3)
            ]  # (B, n_a) each
            out[:, 3] = (
                inside[0][:, :, None, None] & inside[1][:, None, :, None] & inside[2][:, None, None, :]
            ).float()
        return out

    def forward(self, prompts: Prompts, size: Sequence[int], grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sparse (B, N', C), dense (B, C, *grid))`` for prompts on a model input of ``size`` voxels.

        Raises:
            InputShapeError: 2-D prompts, or no point, box or previous mask (a class alone prompts nothing here).
        """
        if prompts.spatial_dims not in (None, 3):
            raise InputShapeError(
                f"a volumetric promptable model takes 3-D prompts ([B, N, 3] points, [B, 6] boxes), got "
                f"{prompts.spatial_dims}-D ones; use the 2-D promptable model for slices."
            )
        if prompts.point_coords is None and prompts.box is None and prompts.prev_mask is None:
            raise InputShapeError(
                "the promptable model needs points, a box or a previous mask; class_vector alone is not."
            )
        return self.sparse(prompts, size), self.dense(prompts, grid)
