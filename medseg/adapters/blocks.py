"""Where the transformer blocks of each backbone family are, and how their activations are laid out.

Block-level adapters (AdaptFormer, the 3-D adapter, visual prompts) attach to transformer blocks through forward
hooks, so parameter names and the base checkpoint layout stay untouched. Three layouts occur:

=========  ==================================================  ===========================================
layout     blocks                                              activation between blocks
=========  ==================================================  ===========================================
``nhwc``   ``segment_anything`` ``Block`` (SAM ViT-B/L/H),     ``(B, H, W, C)`` (windowing is inside)
           ``sam2`` Hiera ``MultiScaleBlock`` (SAM 2, MedSAM2)
``tokens`` timm ``vision_transformer.Block`` (DINOv2, MAE)     ``(B, prefix + H*W, C)``; prefix = CLS (+ registers)
``tinyvit`` ``TinyViTBlock`` (LiteMedSAM attention stages)     ``(B, H*W, C)`` on the stage's fixed grid
=========  ==================================================  ===========================================

TinyViT's first stage is made of MBConv convolution blocks; they have no token MLP and are not sites.
The first block of each later Hiera stage takes the previous stage's width and grid and pools them (its ``proj``
widens the shortcut, its attention pools the queries); its MLP and its output are at the new stage's width, which is
the site's ``dim``, so adapters on the MLP (AdaptFormer) or on the output (adapter3d) fit every Hiera block.
For the ``tokens`` layout the patch grid ``(H, W)`` depends on the input size, so a forward hook on the ViT's patch
embedding records it in a :class:`GridTracker` shared by the adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from segment_anything.modeling.image_encoder import Block as SamBlock
from torch import nn

from medseg.errors import ConfigError

__all__ = [
    "BlockSite",
    "GridTracker",
    "block_sites",
    "find_blocks",
    "grid_to_tokens",
    "late_sites",
    "select_sites",
    "tokens_to_grid",
]


class GridTracker:
    """Records the patch grid ``(rows, cols)`` of the latest forward of a timm ViT (a hook on its patch embedding)."""

    def __init__(self) -> None:
        self.grid: tuple[int, int] | None = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if output.ndim == 4:  # dynamic_img_size: (B, h, w, D)
            self.grid = (int(output.shape[1]), int(output.shape[2]))
        else:
            self.grid = tuple(int(g) for g in module.grid_size)


@dataclass
class BlockSite:
    """One transformer block an adapter can attach to.

    Attributes:
        name: dotted module name in the model.
        block: the block module.
        layout: ``"nhwc"``, ``"tokens"`` or ``"tinyvit"`` (see the module docstring).
        dim: channels of the block's input and output.
        resolution: fixed ``(H, W)`` grid of a TinyViT stage, else ``None``.
        tracker: grid of the latest forward, for the ``tokens`` layout.
        owner: the timm ``VisionTransformer`` the block belongs to (``tokens`` layout), for VPT.
    """

    name: str
    block: nn.Module
    layout: str
    dim: int
    resolution: tuple[int, int] | None = None
    tracker: GridTracker | None = None
    owner: nn.Module | None = None


def _tracker_for(vit: nn.Module) -> GridTracker:
    tracker = getattr(vit, "_medseg_grid_tracker", None)
    if tracker is None:
        tracker = GridTracker()
        vit.patch_embed.register_forward_hook(tracker)
        vit._medseg_grid_tracker = tracker
    return tracker


def _is_hiera_block(module: nn.Module) -> bool:
    """A block of ``sam2``'s Hiera, recognised by class without importing ``sam2`` (an optional extra)."""
    kind = type(module)
    return kind.__name__ == "MultiScaleBlock" and kind.__module__.startswith("sam2.") and hasattr(module, "dim_out")


def find_blocks(model: nn.Module, method: str = "adapter") -> list[BlockSite]:
    """The transformer blocks of ``model`` in forward order.

    Raises:
        ConfigError: the model has no block of a supported family (SAM, SAM 2 Hiera, timm ViT, TinyViT attention
            stage).
    """
    # lazy (both): timm costs ~2 s to import; `import medseg` and SAM-only runs do not load it
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer

    vits = {id(b): m for _, m in model.named_modules() if isinstance(m, VisionTransformer) for b in m.blocks}
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, SamBlock):
            sites.append(BlockSite(name, module, "nhwc", module.norm1.normalized_shape[0]))
        elif isinstance(module, TimmBlock) and id(module) in vits:
            vit = vits[id(module)]
            dim = module.norm1.normalized_shape[0]
            sites.append(BlockSite(name, module, "tokens", dim, tracker=_tracker_for(vit), owner=vit))
        elif _is_hiera_block(module):
            sites.append(BlockSite(name, module, "nhwc", int(module.dim_out)))
        elif type(module).__name__ == "TinyViTBlock" and hasattr(module, "input_resolution"):
            sites.append(BlockSite(name, module, "tinyvit", module.dim, resolution=tuple(module.input_resolution)))
    if not sites:
        raise ConfigError(
            f"{method}: {type(model).__name__} has no transformer block of a supported family (SAM ViT "
            f"'sam_vit_*', SAM 2 Hiera 'sam2_hiera_*'/'medsam2', timm ViT 'dinov2_*'/'mae_*', LiteMedSAM TinyViT "
            f"attention stages)."
        )
    return sites


def tokens_to_grid(x: torch.Tensor, site: BlockSite) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block activation as a grid ``(B, H, W, C)`` plus the tokens that are not on the grid (CLS, registers).

    For the ``tokens`` layout the patch tokens are the last ``H*W`` ones, so tokens inserted after the class token
    (visual prompts) count as non-grid tokens too.
    """
    if site.layout == "nhwc":
        return x, None
    if site.layout == "tinyvit":
        rows, cols = site.resolution
        return x.reshape(x.shape[0], rows, cols, x.shape[-1]), None
    if site.tracker is None or site.tracker.grid is None:
        raise RuntimeError(f"no patch grid recorded for {site.name}; run the whole backbone, not a single block")
    rows, cols = site.tracker.grid
    extra = x.shape[1] - rows * cols
    return x[:, extra:].reshape(x.shape[0], rows, cols, x.shape[-1]), x[:, :extra]


def grid_to_tokens(grid: torch.Tensor, site: BlockSite, others: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`tokens_to_grid`; ``others`` are put back in front."""
    if site.layout == "nhwc":
        return grid
    tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
    if others is None or others.shape[1] == 0:
        return tokens
    return torch.cat([others, tokens], dim=1)


def select_sites(sites: list, blocks: Sequence[int] | None, method: str) -> list:
    """The sites with the given block indices (negative count from the end); all when ``blocks`` is ``None``."""
    if blocks is None:
        return sites
    out = []
    for index in blocks:
        if not -len(sites) <= index < len(sites):
            raise ConfigError(f"{method}: block index {index} out of range; the model has {len(sites)} blocks.")
        out.append(sites[index])
    return out


def late_sites(model: nn.Module, last_k_blocks: int | None, method: str) -> list[BlockSite] | None:
    """The last ``last_k_blocks`` transformer blocks of ``model`` (late adaptation), or ``None`` when not set.

    Late adaptation puts a method's parameters in the last ``k`` blocks only: the blocks below are frozen, so the
    backbone runs them without gradients and keeps none of their activations (:mod:`medseg.backbones.compute`).
    Blocks are counted as :func:`find_blocks` finds them (TinyViT: its attention blocks, not the MBConv stage).

    Raises:
        ConfigError: ``last_k_blocks`` is not between 1 and the number of blocks.
    """
    if last_k_blocks is None:
        return None
    sites = find_blocks(model, method)
    if isinstance(last_k_blocks, bool) or not isinstance(last_k_blocks, int) or not 1 <= last_k_blocks <= len(sites):
        raise ConfigError(
            f"{method}: last_k_blocks must be an integer from 1 to {len(sites)} (the transformer blocks of "
            f"{type(model).__name__}), got {last_k_blocks!r}; null adapts every block."
        )
    return sites[-last_k_blocks:]


def block_sites(
    model: nn.Module, blocks: Sequence[int] | None, last_k_blocks: int | None, method: str
) -> list[BlockSite]:
    """The sites a block-level adapter attaches to: ``blocks`` (indices), the last ``last_k_blocks``, or all."""
    if blocks is not None and last_k_blocks is not None:
        raise ConfigError(f"{method}: give either blocks (indices) or last_k_blocks, not both.")
    late = late_sites(model, last_k_blocks, method)
    return late if late is not None else select_sites(find_blocks(model, method), blocks, method)
