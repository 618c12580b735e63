"""``adapter3d``: the 3DSAM-adapter design (Gong et al. 2024), letting a 2-D pretrained ViT see across slices.

After each transformer block, ``x <- x + up(act(conv3d(act(down(x)))))`` where ``down``/``up`` are linear layers on
the channels and ``conv3d`` is a depthwise ``k x k x k`` convolution over (depth, height, width) of the bottleneck
features. ``up`` is zero-initialised, so every block is the identity map at initialisation and the adapted model
equals the base model. CLS and register tokens (DINOv2/MAE) are not on the grid and pass through unchanged.

How the adapter learns the depth. A volume of ``D`` slices goes through the ViT as a batch of ``B * D`` slice images,
ordered volume-major: slices ``0..D-1`` of volume 0, then volume 1... The ViT itself never needs to know; the adapters
do, and the caller tells them::

    with volume_depth(model, D):
        features = model(x.reshape(B * D, C, H, W))  # x: (B, D, C, H, W)

:func:`volume_depth` sets the depth of every :class:`Adapter3d` in ``model`` for the duration of the block
(:func:`set_volume_depth` sets it until changed). Outside it the depth is 1: each image of the batch is a volume of
one slice (2-D training), and the convolution sees only zero padding along depth. A batch that is not a multiple of
the depth is an error rather than a silent mix of volumes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from medseg.adapters.blocks import BlockSite, block_sites, grid_to_tokens, tokens_to_grid
from medseg.errors import ConfigError, MedsegError

__all__ = ["Adapter3d", "VolumeDepthError", "apply_adapter3d", "set_volume_depth", "volume_depth"]


class VolumeDepthError(MedsegError, ValueError):
    """The batch of slices is not a whole number of volumes of the declared depth."""


class Adapter3d(nn.Module):
    """Linear down -> GELU -> depthwise Conv3d over (D, H, W) -> GELU -> Linear up (zero-initialised).

    Args:
        dim: channels of the block.
        bottleneck: channels of the 3-D convolution.
        kernel_size: odd kernel side in voxels of the tokens grid (slices along depth, patches in plane).

    Attributes:
        depth: slices per volume in the current batch (see :func:`volume_depth`); ``None`` means 1.
    """

    def __init__(self, dim: int, bottleneck: int = 64, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ConfigError(f"adapter3d: kernel_size must be odd to keep the grid size, got {kernel_size}.")
        self.down = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv3d(bottleneck, bottleneck, kernel_size, padding=kernel_size // 2, groups=bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.depth: int | None = None

    #: ``depth`` is set around the forward (``volume_depth``); a block recomputed in backward under activation
    #: checkpointing must see the value of its forward (see :mod:`medseg.backbones.compute`).
    _medseg_replay = ("depth",)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """Map ``(B*D, H, W, C)`` slice features to the residual update of the same shape."""
        depth = self.depth or 1
        n, rows, cols, _ = grid.shape
        if n % depth:
            raise VolumeDepthError(
                f"adapter3d: a batch of {n} slices is not a whole number of volumes of depth {depth}; pass slices "
                f"volume-major as (B * D, C, H, W) inside `with volume_depth(model, D)`."
            )
        y = self.act(self.down(grid))  # (B*D, H, W, c)
        y = y.reshape(n // depth, depth, rows, cols, -1).permute(0, 4, 1, 2, 3)  # (B, c, D, H, W)
        y = self.act(self.conv(y))
        y = y.permute(0, 2, 3, 4, 1).reshape(n, rows, cols, -1)
        return self.up(y)


class _SerialHook:
    """Forward hook on a block: adds the adapter's update to the block output, on the patch grid only."""

    def __init__(self, adapter: Adapter3d, site: BlockSite) -> None:
        self.adapter = adapter
        self.site = BlockSite(site.name, None, site.layout, site.dim, site.resolution, site.tracker, None)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        grid, others = tokens_to_grid(output, self.site)
        update = self.adapter(grid)
        zeros = None if others is None else torch.zeros_like(others)
        return output + grid_to_tokens(update, self.site, zeros)


def apply_adapter3d(
    model: nn.Module,
    bottleneck: int = 64,
    kernel_size: int = 3,
    blocks: Sequence[int] | None = None,
    last_k_blocks: int | None = None,
) -> list[str]:
    """Add a 3-D adapter after each transformer block (or after ``blocks``, or the last ``last_k_blocks``).

    Returns:
        The names of the parameters made trainable.
    """
    names = []
    for site in block_sites(model, blocks, last_k_blocks, "adapter3d"):
        param = next(site.block.parameters())
        adapter = Adapter3d(site.dim, bottleneck, kernel_size).to(param.device, param.dtype)
        site.block.add_module("adapter3d", adapter)
        site.block.register_forward_hook(_SerialHook(adapter, site))
        names += [f"{site.name}.adapter3d.{n}" for n, _ in adapter.named_parameters()]
    return names


def set_volume_depth(model: nn.Module, depth: int | None) -> int:
    """Set the slices per volume of every :class:`Adapter3d` in ``model``; returns how many adapters were set."""
    if depth is not None and depth < 1:
        raise VolumeDepthError(f"volume depth must be a positive number of slices, got {depth}")
    count = 0
    for module in model.modules():
        if isinstance(module, Adapter3d):
            module.depth = depth
            count += 1
    return count


@contextmanager
def volume_depth(model: nn.Module, depth: int) -> Iterator[nn.Module]:
    """Within the block, batches given to ``model`` are volumes of ``depth`` slices each (volume-major order)."""
    previous = {m: m.depth for m in model.modules() if isinstance(m, Adapter3d)}
    set_volume_depth(model, depth)
    try:
        yield model
    finally:
        for module, value in previous.items():
            module.depth = value
