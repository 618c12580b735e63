"""``ClickDecoder``: SAM's prompt-to-mask step restructured for clicks on a cached image embedding (inference only).

A click on a cached embedding runs ``segment_anything``'s ``MaskDecoder``, whose cost is almost all on the image side
(LiteMedSAM: 64 x 64 = 4096 image tokens of width 256 against about 7 prompt tokens). Most of that work is either
independent of the prompt or can be done against the few prompt tokens instead of the many image tokens, without
changing the function computed (masks and IoU predictions agree with the reference to float rounding, <= 1e-4 in
float32; ``tests/models/test_sam_click.py`` checks it against ``MaskDecoder`` for boxes, points and mask inputs):

* **per image, once** (:class:`ImageContext`, kept for the last embedding clicked on twice): the image tokens plus the
  "no mask" dense embedding, the positional encoding in token layout, and the first two-way block's key and value
  projections of the image (tokens-to-image attention) and query projection (image-to-tokens attention). In the first
  block the image tokens have not yet met the prompt, so these three ``4096 x 256 -> 128`` products are the same for
  every click; ``segment_anything`` recomputes them each time. A mask input changes the image tokens, so clicks with
  a previous mask skip this cache;
* **attention in prompt-token space**: with ``m`` prompt tokens and ``n`` image tokens, ``softmax(q W_k (x W_k')^T)``
  only needs ``(q_h W_k,h) x^T`` (``m x C`` per head times the ``C x n`` image), and the value and output projections
  can be applied to the ``m`` rows of ``softmax @ x`` or to the ``m`` token values instead of the ``n`` image rows.
  Every remaining image-side product is ``n x C x (heads * m)`` (56 columns) instead of ``n x C x 128``; the key bias
  of tokens-to-image attention drops out (constant along the softmax axis) and the output bias of image-to-tokens
  attention folds into the product (each head's attention weights sum to one);
* **upscaling as matrix products**: the two stride-2, 2 x 2 transposed convolutions are per-pixel linear maps, so they
  run as two products in a sub-pixel layout (no deconvolution kernel, no layout copies of the 128 x 128 and 256 x 256
  maps), LayerNorm2d over the last axis, and only the requested masks' hypernetwork products are taken (one mask, or
  the three multimask ones, never the four of which one is thrown away); only those masks are put back in image order.

Used by :meth:`medseg.models.promptable.PromptableSegmenter.decode` when autograd is off (inference, validation
clicks); training keeps ``segment_anything``'s modules, so gradients are theirs. A decoder whose layout differs from
SAM's (another attention or upscaling module) is reported by :func:`supports` and decoded by the reference path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClickDecoder", "ImageContext", "supports"]

_CHUNK = 1024  # image tokens per step of the upscaling (see _upscaled_masks)

_STANDARD = (nn.Linear,)


def _is_attention(module: nn.Module) -> bool:
    """``segment_anything``'s ``Attention`` (q/k/v/out projections, ``num_heads``), not a wrapped or replaced one."""
    names = ("q_proj", "k_proj", "v_proj", "out_proj")
    return hasattr(module, "num_heads") and all(type(getattr(module, n, None)) in _STANDARD for n in names)


def supports(prompt_encoder: nn.Module, mask_decoder: nn.Module) -> bool:
    """Whether ``mask_decoder`` has the layout of ``segment_anything``'s ``MaskDecoder`` that :class:`ClickDecoder`
    restructures (two-way transformer of SAM attention blocks, transposed-convolution upscaling, GELUs)."""
    transformer = getattr(mask_decoder, "transformer", None)
    upscaling = getattr(mask_decoder, "output_upscaling", None)
    if transformer is None or upscaling is None or not hasattr(prompt_encoder, "no_mask_embed"):
        return False
    layers = list(getattr(transformer, "layers", []))
    names = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
    blocks_ok = bool(layers) and all(
        all(_is_attention(getattr(block, name, None)) for name in names)
        and bool(getattr(block, "skip_first_layer_pe", False)) == (index == 0)
        for index, block in enumerate(layers)
    )
    if not blocks_ok or not _is_attention(getattr(transformer, "final_attn_token_to_image", None)):
        return False
    parts = list(upscaling) if isinstance(upscaling, nn.Sequential) else []
    if [type(p).__name__ for p in parts] != ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d", "GELU"]:
        return False
    convs_ok = all(
        conv.kernel_size == (2, 2) and conv.stride == (2, 2) and conv.padding == (0, 0) and conv.groups == 1
        and conv.dilation == (1, 1) and tuple(conv.output_padding) == (0, 0) and conv.bias is not None
        for conv in (parts[0], parts[3])
    )  # fmt: skip
    return convs_ok and parts[2].approximate == parts[4].approximate == "none"


class ImageContext(NamedTuple):
    """What clicks on one image share (batch ``B``, ``n`` image tokens, width ``C``, ``H`` heads of width ``d``).

    Attributes:
        source: the embedding tensor it was made from (kept so that its identity cannot be reused).
        key: identity, weights and numerics it is valid for.
        src: ``(B, n, C)`` image tokens plus the no-mask dense embedding.
        pe: ``(1, n, C)`` positional encoding of the grid.
        k1, v1: ``(B, H, n, d)`` first block's tokens-to-image key and value projections of the image.
        q1: ``(B, H, n, d)`` first block's image-to-tokens query projection, scaled by ``1 / sqrt(d)``.
    """

    source: torch.Tensor
    key: tuple
    src: torch.Tensor
    pe: torch.Tensor
    k1: torch.Tensor
    v1: torch.Tensor
    q1: torch.Tensor


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H * d) -> (B, H, N, d)``, contiguous."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2).contiguous()


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, d) -> (B, N, H * d)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _head_weight(linear: nn.Linear, heads: int) -> torch.Tensor:
    """A projection's weight ``(H * d, C)`` as ``(H, d, C)``."""
    return linear.weight.reshape(heads, -1, linear.weight.shape[-1])


def _tokens_to_image(attn: nn.Module, q: torch.Tensor, k_image: torch.Tensor, v_image: torch.Tensor) -> torch.Tensor:
    """``attn(q=q, k=k_image, v=v_image)`` for few queries: every product against the image has ``H * m`` columns.

    ``softmax(Q_h (X W_k,h^T + b_k,h)^T / sqrt(d))`` equals ``softmax((Q_h W_k,h) X^T / sqrt(d))`` (the bias adds a
    constant along the softmax axis), and ``P (V W_v,h^T + b_v,h) = (P V) W_v,h^T + b_v,h`` (rows of ``P`` sum to 1).
    """
    heads = attn.num_heads
    b, m, _ = q.shape
    query = _heads(attn.q_proj(q), heads)  # (B, H, m, d)
    scale = 1.0 / math.sqrt(query.shape[-1])
    a = torch.matmul(query * scale, _head_weight(attn.k_proj, heads))  # (B, H, m, C)
    logits = torch.bmm(a.reshape(b, heads * m, -1), k_image.transpose(1, 2))  # (B, H m, n)
    weights = torch.softmax(logits, dim=-1)
    pooled = torch.bmm(weights, v_image).reshape(b, heads, m, -1)  # (B, H, m, C)
    values = torch.matmul(pooled, _head_weight(attn.v_proj, heads).transpose(1, 2))  # (B, H, m, d)
    values = values + attn.v_proj.bias.reshape(heads, 1, -1)
    return attn.out_proj(_merge(values))


def _image_to_tokens(
    attn: nn.Module,
    q_image: torch.Tensor | None,
    k_tokens: torch.Tensor,
    v_tokens: torch.Tensor,
    residual: torch.Tensor,
    projected: torch.Tensor | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """``residual + attn(q=q_image, k=k_tokens, v=v_tokens)`` for many queries and few keys (``in_place``: added
    into ``residual``, which saves a copy of the image tokens).

    The logits are computed transposed, ``(B, H, m, n)``, so that the softmax runs along a non-final axis of only
    ``m`` entries with the image axis contiguous. With ``projected`` (the image's query projection, scaled), they are
    ``K_h projected_h^T``; otherwise ``(K_h W_q,h) X^T + K_h b_q,h`` against the image ``q_image``. The output
    projection is applied to the ``m`` token values (``M_h = V_h W_o,h^T``), and its bias is added as ``b_o / H`` to
    every row of ``M``: each head's weights sum to one, so the product adds exactly ``b_o``.
    """
    heads = attn.num_heads
    b, m, _ = k_tokens.shape
    keys = _heads(attn.k_proj(k_tokens), heads)  # (B, H, m, d)
    if projected is not None:
        logits = torch.matmul(keys, projected.transpose(-1, -2))  # (B, H, m, n)
    else:
        scale = 1.0 / math.sqrt(keys.shape[-1])
        a = torch.matmul(keys * scale, _head_weight(attn.q_proj, heads))  # (B, H, m, C)
        bias = torch.matmul(keys * scale, attn.q_proj.bias.reshape(heads, -1, 1))  # (B, H, m, 1)
        logits = torch.baddbmm(bias.reshape(b, heads * m, 1), a.reshape(b, heads * m, -1), q_image.transpose(1, 2))
        logits = logits.reshape(b, heads, m, -1)
    weights = torch.softmax(logits, dim=2).reshape(b, heads * m, -1)  # (B, H m, n)
    values = _heads(attn.v_proj(v_tokens), heads)  # (B, H, m, d)
    out_weight = attn.out_proj.weight.reshape(attn.out_proj.weight.shape[0], heads, -1).permute(1, 2, 0)  # (H, d, C)
    mixed = torch.matmul(values, out_weight) + attn.out_proj.bias / heads  # (B, H, m, C)
    mixed = mixed.reshape(b, heads * m, -1)
    if in_place and weights.dtype == mixed.dtype == residual.dtype:  # in-place ops are not autocast
        for item in range(b):  # 2-D addmm_ writes into residual; baddbmm_ goes through a copy of it
            residual[item].addmm_(weights[item].t(), mixed[item])
        return residual
    return torch.baddbmm(residual, weights.transpose(1, 2), mixed)


def _layer_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class ClickDecoder:
    """Inference-only twin of ``decode_masks`` over a prompt encoder and mask decoder (module docstring).

    It holds references to the two modules (no parameters of its own, nothing in any state dict), so weight updates
    reach it; :class:`ImageContext` entries carry the weights' version counters and are remade after a change.

    Args:
        prompt_encoder, mask_decoder: ``segment_anything``'s (or LiteMedSAM's vendored) modules, see :func:`supports`.
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.context: ImageContext | None = None
        self._seen: tuple | None = None
        self.contexts_built = 0
        self._run = self._decode

    def compile(self, backend: str = "inductor", **options) -> None:
        """``torch.compile`` the per-click computation (the context is built eagerly, once per image)."""
        self._run = torch.compile(self._decode, backend=backend, **options)

    def _as_weights(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The embedding in the decoder's dtype: a bfloat16 encoder's output is decoded in float32 (see
        :meth:`medseg.models.promptable.PromptableSegmenter.decode`); one cast per click, none in float32."""
        return embeddings.to(self.mask_decoder.iou_token.weight.dtype)

    def _weights_key(self) -> tuple | None:
        first = self.mask_decoder.transformer.layers[0]
        tensors = [
            self.prompt_encoder.no_mask_embed.weight,
            *(p for a in (first.cross_attn_token_to_image, first.cross_attn_image_to_token) for p in a.parameters()),
        ]
        try:
            return tuple((id(t), t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:  # inference-mode parameters have no version counter: never cache
            return None

    def _key(self, embeddings: torch.Tensor, image_pe: torch.Tensor) -> tuple | None:
        weights = self._weights_key()
        if weights is None:
            return None
        try:
            version = embeddings._version
        except RuntimeError:  # an inference-mode tensor (medseg's caches hold those): identity and storage only
            version = None
        autocast = tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))
        identity = (id(embeddings), embeddings.data_ptr(), version, tuple(embeddings.shape), embeddings.dtype)
        return identity, (id(image_pe), image_pe.data_ptr()), weights, autocast, torch.is_inference_mode_enabled()

    def image_context(self, embeddings: torch.Tensor, image_pe: torch.Tensor) -> ImageContext:
        """The prompt-independent tensors of ``embeddings`` (no mask input), made now (not stored)."""
        layer = self.mask_decoder.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        src = self._as_weights(embeddings).flatten(2).transpose(1, 2) + self.prompt_encoder.no_mask_embed.weight
        pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        with_pe = src + pe
        q1 = _heads(i2t.q_proj(with_pe), i2t.num_heads)
        q1 = q1 * (1.0 / math.sqrt(q1.shape[-1]))
        k1, v1 = _heads(t2i.k_proj(with_pe), t2i.num_heads), _heads(t2i.v_proj(src), t2i.num_heads)
        return ImageContext(embeddings, (), src, pe, k1, v1, q1)

    def _cached_context(self, embeddings: torch.Tensor, image_pe: torch.Tensor) -> ImageContext | None:
        """The stored context of ``embeddings`` if valid; one is made on the second click on the same embedding of a
        single image (a slice decoded once, as in propagation, would not repay it)."""
        if embeddings.shape[0] != 1:
            return None
        key = self._key(embeddings, image_pe)
        if key is None:
            return None
        if self.context is not None and self.context.source is embeddings and self.context.key == key:
            return self.context
        if self._seen != key:
            self._seen = key
            return None
        self.context = self.image_context(embeddings, image_pe)._replace(key=key)
        self.contexts_built += 1
        return self.context

    def __call__(
        self,
        embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode_masks``' outputs: low-resolution logits ``(B, M, 4h, 4w)`` and IoU predictions ``(B, M)``.

        Args:
            embeddings: ``(B, C, h, w)``, one prompt set per image.
            image_pe: ``(1, C, h, w)`` dense positional encoding.
            points, boxes, masks: SAM's prompt arguments, batch ``B`` (boxes ``(B, 4)``).
        """
        boxes = None if boxes is None else boxes.reshape(-1, 4)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        context = self._cached_context(embeddings, image_pe) if masks is None else None
        if context is not None:
            src, pe, first = context.src, context.pe, (context.k1, context.v1, context.q1)
        else:
            src = (self._as_weights(embeddings) + dense).flatten(2).transpose(1, 2).contiguous()  # mask or no mask
            pe, first = image_pe.flatten(2).transpose(1, 2).contiguous(), None
        return self._run(src, pe, sparse, first, embeddings.shape[-2:], multimask_output)

    def _decode(self, src, pe, sparse, first, grid, multimask_output):
        decoder = self.mask_decoder
        transformer = decoder.transformer
        b = src.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse.to(output_tokens.dtype)], dim=1)
        queries, keys = tokens, src
        for index, layer in enumerate(transformer.layers):
            if index == 0:
                queries = _layer_norm(layer.self_attn(q=queries, k=queries, v=queries), layer.norm1)
            else:
                q = queries + tokens
                queries = _layer_norm(queries + layer.self_attn(q=q, k=q, v=queries), layer.norm1)
            q = queries + tokens
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            if index == 0 and first is not None:  # the cached projections of the image
                k1, v1, _ = first
                attended = F.scaled_dot_product_attention(_heads(t2i.q_proj(q), t2i.num_heads), k1, v1)
                queries = queries + t2i.out_proj(_merge(attended))
                with_pe = None
            else:
                with_pe = keys + pe
                queries = queries + _tokens_to_image(t2i, q, with_pe, keys)
            queries = _layer_norm(queries, layer.norm2)
            queries = _layer_norm(queries + layer.mlp(queries), layer.norm3)
            q = queries + tokens
            cached = index == 0 and first is not None  # then keys are the context's, kept unchanged
            projected = first[2] if cached else None
            keys = _image_to_tokens(i2t, with_pe, q, queries, keys, projected, in_place=not cached)
            keys = _layer_norm(keys, layer.norm4)
        final = transformer.final_attn_token_to_image
        queries = queries + _tokens_to_image(final, queries + tokens, keys + pe, keys)
        queries = _layer_norm(queries, transformer.norm_final_attn)

        chosen = range(1, decoder.num_mask_tokens) if multimask_output else range(1)
        hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i]) for i in chosen], dim=1)
        iou = decoder.iou_prediction_head(queries[:, 0])[:, chosen.start : chosen.stop]
        return _upscaled_masks(decoder.output_upscaling, keys, hyper, grid), iou


def _subpixel(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2 x 2, stride-2 transposed convolution as ``(C_in, 4 C_out)`` weights and ``(4 C_out)`` bias, the outputs
    ordered (row offset, column offset, channel)."""
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)
    return weight, conv.bias.repeat(4)


def _upscaled_masks(upscaling: nn.Sequential, keys: torch.Tensor, hyper: torch.Tensor, grid) -> torch.Tensor:
    """``hyper @ output_upscaling(keys as a map)`` for the chosen tokens, via the sub-pixel layout.

    ``keys`` ``(B, n, C)``, ``hyper`` ``(B, M, C / 8)``; returns ``(B, M, 4h, 4w)``. Pixel ``(i, j)`` of the grid
    becomes the 2 x 2 block ``(2i + a, 2j + b)`` after the first convolution and the 4 x 4 block
    ``(4i + 2a + a', 4j + 2b + b')`` after the second; the layout stays ``(i, j, a, b, a', b')`` until the masks.
    The pixels run in chunks of :data:`_CHUNK`: the whole-map intermediates (4 and 8 MB for LiteMedSAM) would be
    fresh allocations on every click, which the C allocator hands back to the system and page-faults in again (on
    a loaded two-core CPU that doubled this step's time); a chunk's stay small and in cache.
    """
    conv1, norm, gelu1, conv2, gelu2 = upscaling
    b, n, _ = keys.shape
    h, w = grid
    w1, b1 = _subpixel(conv1)
    w2, b2 = _subpixel(conv2)
    masks = []
    for item in range(b):
        weights = hyper[item].t()  # (C / 8, M)
        for start in range(0, n, _CHUNK):
            x = torch.addmm(b1, keys[item, start : start + _CHUNK], w1)  # (chunk, 4 C / 4)
            x = x.reshape(-1, w1.shape[1] // 4)
            x = gelu1(F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))
            x = gelu2(torch.addmm(b2, x, w2)).reshape(-1, w2.shape[1] // 4)  # (chunk 16, C / 8)
            masks.append(torch.mm(x, weights.to(x.dtype)))  # (chunk 16, M)
    out = torch.cat(masks) if len(masks) > 1 else masks[0]
    out = out.reshape(b, h, w, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return out.reshape(b, -1, 4 * h, 4 * w)
