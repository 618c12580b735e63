"""``vpt``: Visual Prompt Tuning (Jia et al. 2022), shallow or deep, for ViTs that work on a token sequence.

``num_tokens`` learned prompt tokens are inserted after the class (and register) tokens, in front of the patch
tokens. *Shallow*: one set enters the first block and is carried through the following blocks like any token.
*Deep*: every block gets its own set; the prompts coming out of a block are discarded and replaced by the next
block's. Prompts are removed from every block's output (forward hooks), so intermediates, the feature map and the
class token keep the base model's shapes. The prompts change every token's attention, so, unlike LoRA or the
zero-initialised adapters, **VPT does not reproduce the base model's outputs at initialisation**.

Supported backbones: the timm ViTs, ``dinov2_*`` (with or without registers) and ``mae_*``. Not supported, with an
error: ``sam_vit_*``, whose blocks work on a ``(B, H, W, C)`` grid cut into 14 x 14 windows in most blocks (an extra
token has no grid position or window), and ``litemedsam``, whose TinyViT stages likewise attend within fixed
windows of a fixed grid. Prompts restricted to SAM's four global-attention blocks would be a different method with
no published baseline; use LoRA or an adapter there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medseg.adapters.blocks import find_blocks, late_sites
from medseg.errors import ConfigError

__all__ = ["VPT_SUPPORTED", "VisualPrompts", "apply_vpt"]

VPT_SUPPORTED = ("dinov2_*", "mae_*")


class VisualPrompts(nn.Module):
    """Prompt tokens ``(sets, num_tokens, dim)``: one set (shallow) or one per block (deep).

    Initialised uniformly in ``+-sqrt(6 / (3 * patch**2 + dim))`` as in the VPT code (Xavier on the patch
    embedding's fan-in and fan-out).
    """

    def __init__(self, num_blocks: int, num_tokens: int, dim: int, deep: bool, patch_size: int, num_prefix: int):
        super().__init__()
        self.deep, self.num_tokens, self.num_prefix = deep, num_tokens, num_prefix
        self.tokens = nn.Parameter(torch.empty(num_blocks if deep else 1, num_tokens, dim))
        bound = math.sqrt(6.0 / (3 * patch_size**2 + dim))
        nn.init.uniform_(self.tokens, -bound, bound)
        self._carry: torch.Tensor | None = None

    #: Shallow prompts are carried from one block to the next; a block recomputed in backward under activation
    #: checkpointing must get the carry of its forward (see :mod:`medseg.backbones.compute`).
    _medseg_replay = ("_carry",)

    def insert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, prefix + N, D)`` -> ``(B, prefix + P + N, D)`` for block ``index``."""
        if self.deep or index == 0:
            prompts = self.tokens[index if self.deep else 0].unsqueeze(0).expand(x.shape[0], -1, -1)
        else:
            prompts = self._carry
            if prompts is None or prompts.shape[0] != x.shape[0]:
                raise RuntimeError("shallow VPT: the blocks must run in order, starting from the first")
        prompts = prompts.to(x.dtype)
        return torch.cat([x[:, : self.num_prefix], prompts, x[:, self.num_prefix :]], dim=1)

    def remove(self, x: torch.Tensor) -> torch.Tensor:
        """Drop the prompt tokens from a block output (keeping them for the next block when shallow)."""
        start, stop = self.num_prefix, self.num_prefix + self.num_tokens
        if not self.deep:
            self._carry = x[:, start:stop]
        return torch.cat([x[:, :start], x[:, stop:]], dim=1)


class _Insert:
    def __init__(self, prompts: VisualPrompts, index: int) -> None:
        self.prompts, self.index = prompts, index

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.prompts.insert(self.index, args[0]), *args[1:])


class _Remove:
    def __init__(self, prompts: VisualPrompts) -> None:
        self.prompts = prompts

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.prompts.remove(output)


def apply_vpt(
    model: nn.Module, num_tokens: int = 10, deep: bool = False, last_k_blocks: int | None = None
) -> list[str]:
    """Add ``num_tokens`` prompt tokens to every ViT in ``model`` (shallow, or ``deep``: a set per block).

    With ``last_k_blocks`` the prompts enter at the first of the last ``k`` blocks (shallow) or in each of them
    (deep), and are held by that first block (``blocks.N.vpt_prompts``), so the blocks below stay frozen and run
    without gradients.

    Returns:
        The names of the parameters made trainable.

    Raises:
        ConfigError: the model has no token-sequence ViT (SAM, LiteMedSAM); the message names the supported ones.
    """
    if num_tokens < 1:
        raise ConfigError(f"vpt: num_tokens must be a positive number of prompt tokens, got {num_tokens}.")
    sites = find_blocks(model, "vpt")
    unsupported = sorted({s.layout for s in sites if s.layout != "tokens"})
    if unsupported:
        raise ConfigError(
            f"vpt: {type(model).__name__} has blocks of layout {unsupported} (SAM's windowed (B, H, W, C) blocks or "
            f"TinyViT's fixed-window stages), where prompt tokens have no place. VPT supports the token-sequence ViTs "
            f"{', '.join(VPT_SUPPORTED)}; use lora, adaptformer or ssf for sam_vit_* and litemedsam."
        )
    late = late_sites(model, last_k_blocks, "vpt")
    names = []
    owners = {}
    for site in sites if late is None else late:
        owners.setdefault(id(site.owner), (site.owner, []))[1].append(site)
    for vit, vit_sites in owners.values():
        ref = vit.cls_token
        prompts = VisualPrompts(
            len(vit_sites), num_tokens, vit_sites[0].dim, deep, vit.patch_embed.patch_size[0], vit.num_prefix_tokens
        ).to(ref.device, ref.dtype)
        holder, holder_name = (vit, _name_of(model, vit)) if late is None else (vit_sites[0].block, vit_sites[0].name)
        holder.add_module("vpt_prompts", prompts)
        for index, site in enumerate(vit_sites):
            site.block.register_forward_pre_hook(_Insert(prompts, index))
            site.block.register_forward_hook(_Remove(prompts))
        names.append(f"{holder_name}.vpt_prompts.tokens" if holder_name else "vpt_prompts.tokens")
    return names


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)
