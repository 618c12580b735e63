"""SAM 2 / SAM 2.1 Hiera image encoders and MedSAM2 (``sam2`` package) behind the :class:`Backbone` contract.

The networks are ``sam2``'s own modules (``ImageEncoder`` = ``Hiera`` trunk + ``FpnNeck`` with
``PositionEmbeddingSine``; ``SAM2Base`` with its prompt encoder, mask decoder and memory modules), instantiated from
the package's own configs (:mod:`medseg.backbones.sam2_configs`), so the official ``sam2.1_hiera_*.pt`` files and
MedSAM2's ``MedSAM2_latest.pt`` (``{"model": SAM2Base state dict}``) load strictly:

* the dense backbone (:func:`create_backbone`, ``conf/backbone/sam2_*.yaml``) loads the ``image_encoder.*`` part of
  the file, strictly; the rest of the file is the promptable path's;
* :func:`build_sam2_components` loads the whole ``SAM2Base`` strictly and keeps it reachable
  (:attr:`Sam2Components.model`: memory attention, memory encoder, ``no_mem_embed``, object pointers), for memory
  propagation and fine-tuning of the promptable model to build on.

Features. Hiera has four stages at strides 4, 8, 16 and 32 pixels (widths ``C, 2C, 4C, 8C``; Hiera-T: 96-768). SAM 2's
neck turns them into 256-channel FPN levels and drops the coarsest (``scalp=1``); ``features`` is the stride-16 level,
the image embedding SAM 2's mask decoder reads (``vision_features``), so ``patch_size`` is 16. ``layers=`` indexes the
Hiera blocks; intermediate ``i`` is ``(B, block_dims[i], H / block_strides[i], W / block_strides[i])``, the feature
pyramid the UNETR decoder uses (its default skips are the ends of the first three stages). :meth:`Sam2Backbone.encode`
returns ``sam2``'s own encoder output (all FPN levels and their position encodings) for the promptable path.

Input. SAM 2 normalises RGB images in [0, 1] with the ImageNet mean and standard deviation (``SAM2Transforms``);
a grey image is repeated onto the three channels by the channel adapter. The trunk needs sides that are multiples of 32
pixels; :meth:`Sam2Backbone.forward_features` pads other sizes with zeros at the bottom and right (after
normalisation, as SAM pads its inputs) and crops every output back to ``ceil(side / stride)``.

Attention. Hiera's ``MultiScaleAttention`` already computes ``scaled_dot_product_attention`` in ``sam2``'s own code,
so ``attention=fused`` and ``reference`` run the same code; both are accepted so that every backbone takes the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medseg.backbones.attention import check_attention_mode
from medseg.backbones.base import Backbone, BackboneOutput, InputSpec
from medseg.backbones.registry import BackboneEntry, get_entry, register_backbone
from medseg.backbones.sam2_configs import (
    SAM2_ALIASES,
    SAM2_MODELS,
    build_sam2_image_encoder,
    build_sam2_model,
)
from medseg.backbones.weights import load_state_dict_strict, read_checkpoint, resolve_checkpoint, strip_prefixes
from medseg.errors import ConfigError, InputShapeError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Sam2Backbone",
    "Sam2Components",
    "Sam2ImageFeatures",
    "Sam2Masks",
    "build_sam2_components",
    "decode_sam2_masks",
    "prepare_image_features",
]

# SAM 2's preprocessing (sam2/utils/transforms.py): RGB in [0, 1], ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ENCODER_PREFIX = "image_encoder."


class Sam2Components(NamedTuple):
    """The modules of a SAM 2 model; the first three are attributes of ``model`` (one set of weights).

    Attributes:
        image_encoder: ``ImageEncoder`` (Hiera + FPN neck).
        prompt_encoder: ``sam_prompt_encoder``.
        mask_decoder: ``sam_mask_decoder`` (with the ``conv_s0``/``conv_s1`` high-resolution projections).
        model: the whole ``SAM2Base`` (memory attention and encoder, ``no_mem_embed``, object-pointer heads).
    """

    image_encoder: nn.Module
    prompt_encoder: nn.Module
    mask_decoder: nn.Module
    model: nn.Module


class Sam2ImageFeatures(NamedTuple):
    """What SAM 2's mask decoder reads from one image batch (``SAM2ImagePredictor._features``).

    Attributes:
        image_embed: ``(B, 256, H/16, W/16)``, the stride-16 FPN level plus ``no_mem_embed`` (a frame without memory).
        high_res_feats: ``[(B, 32, H/4, W/4), (B, 64, H/8, W/8)]`` after the decoder's ``conv_s0``/``conv_s1``.
    """

    image_embed: torch.Tensor
    high_res_feats: list[torch.Tensor]


class Sam2Masks(NamedTuple):
    """Output of :func:`decode_sam2_masks`: the mask decoder's four outputs, batch ``b`` for image ``b``.

    Attributes:
        logits: low-resolution mask logits ``(B, M, H/4, W/4)``, ``M`` 1 or 3 (``multimask_output``).
        iou: predicted IoU ``(B, M)``.
        tokens: the SAM output tokens ``(B, M or 1, 256)`` (object pointers for memory are projected from them).
        object_score_logits: ``(B, 1)`` whether the object is present (SAM 2.1's occlusion head).
    """

    logits: torch.Tensor
    iou: torch.Tensor
    tokens: torch.Tensor
    object_score_logits: torch.Tensor


def _sam2_entry(name: str) -> BackboneEntry:
    entry = get_entry(name)
    if entry.family != "sam2":
        raise ConfigError(f"{name!r} is a {entry.family} backbone, not SAM 2; expected one of {sorted(SAM2_MODELS)}.")
    return entry


def build_sam2_components(
    name: str,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    *,
    img_size: int | None = None,
    arch: Mapping[str, Any] | None = None,
    postprocessing: bool = True,
) -> Sam2Components:
    """The whole SAM 2 model of ``name``, every key of the official file loaded strictly.

    Args:
        name: ``sam2_hiera_t/s/b_plus/l`` (or ``sam2_hiera_b+``) or ``medsam2``.
        pretrained: ``False`` gives the same modules with ``sam2``'s standard initialisation (the scratch twin).
        checkpoint: explicit path; otherwise the official file in ``$MEDSEG_WEIGHTS``.
        img_size: side in pixels the prompt encoder and mask decoder are built for (a multiple of 32; default the
            model's, 1024 or MedSAM2's 512).
        arch: Hiera overrides for tiny test models (:data:`~medseg.backbones.sam2_configs.ARCH_KEYS`).
        postprocessing: ``build_sam2``'s inference settings of the mask decoder (no weights).

    Raises:
        WeightsError: the file is missing, unreadable, or does not match the model key for key.
    """
    entry = _sam2_entry(name)
    model = build_sam2_model(entry.name, img_size, arch, postprocessing)
    if pretrained:
        path = resolve_checkpoint(entry, checkpoint)
        state = strip_prefixes(read_checkpoint(path), ("module.",))
        load_state_dict_strict(model, state, path, f"the official SAM 2 file '{entry.filename}' (its 'model' dict)")
    return Sam2Components(model.image_encoder, model.sam_prompt_encoder, model.sam_mask_decoder, model)


def _load_encoder(encoder: nn.Module, path: Path, filename: str) -> None:
    """Strictly load the ``image_encoder.*`` part of a full SAM 2 file (or an encoder-only state dict)."""
    state = strip_prefixes(read_checkpoint(path), ("module.",))
    if any(k.startswith(_ENCODER_PREFIX) for k in state):
        state = {k[len(_ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(_ENCODER_PREFIX)}
    load_state_dict_strict(encoder, state, path, f"the image encoder of the official SAM 2 file '{filename}'")


class Sam2Backbone(Backbone):
    """SAM 2's Hiera image encoder: ``features`` is the stride-16 FPN level ``(B, 256, H/16, W/16)``.

    Args:
        image_encoder: ``sam2``'s ``ImageEncoder``.
        name: registry name.
        image_size: side in pixels the model runs at by default (:attr:`InputSpec.image_size`).
        in_channels, channel_mode: the medical image's channels and how they map onto RGB.
        attention: ``fused`` or ``reference`` (the same code for Hiera, see the module docstring); ``None``: unchecked.
        activation_checkpointing: ``none``, ``all`` or every ``k``-th Hiera block.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        name: str = "sam2",
        image_size: int = 1024,
        in_channels: int = 1,
        channel_mode: str = "repeat",
        attention: str | None = None,
        activation_checkpointing: bool | int | str | None = "none",
    ) -> None:
        super().__init__(in_channels=in_channels, channel_mode=channel_mode, pretrained_in_chans=3)
        self.image_encoder = image_encoder
        self.name = name
        trunk = image_encoder.trunk
        stride = int(trunk.patch_embed.proj.stride[0])
        self.block_dims: list[int] = []
        self.block_strides: list[int] = []
        for block in trunk.blocks:
            stride *= int(block.q_stride[0]) if block.q_stride else 1
            self.block_dims.append(int(block.dim_out))
            self.block_strides.append(stride)
        self.stage_ends = [int(i) for i in trunk.stage_ends]
        level_strides = [self.block_strides[i] for i in self.stage_ends]
        self.patch_size = level_strides[len(level_strides) - 1 - image_encoder.scalp]
        # The trunk's total stride, and the window position embedding tiled over the stride-4 grid.
        window = int(trunk.pos_embed_window.shape[-1]) * int(trunk.patch_embed.proj.stride[0])
        self.size_multiple = math.lcm(self.block_strides[-1], window)
        self.embed_dim = int(image_encoder.neck.d_model)
        self.block_dim = self.block_dims[-1]
        self.num_blocks = len(self.block_dims)
        self.input_spec = InputSpec(
            image_size=int(image_size), in_chans=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, value_range=(0.0, 1.0)
        )
        if attention is not None:
            check_attention_mode(attention)
        self.set_activation_checkpointing(activation_checkpointing)

    def compute_blocks(self) -> tuple[list[nn.Module], list[nn.Module]]:
        return list(self.image_encoder.trunk.blocks), [self.image_encoder.neck]

    def _run(self, x: torch.Tensor, wanted: Sequence[int] = ()) -> tuple[list, list, dict[int, torch.Tensor]]:
        """``Hiera.forward`` then ``ImageEncoder.forward`` block by block: (FPN levels, their position encodings,
        the wanted block outputs as ``(B, C, h, w)``)."""
        encoder, trunk = self.image_encoder, self.image_encoder.trunk
        runner = self.block_runner(x)
        x = trunk.patch_embed(x)  # (B, H/4, W/4, C)
        x = x + trunk._get_pos_embed(x.shape[1:3])
        stages, found = [], {}
        last = trunk.stage_ends[-1]
        for index, block in enumerate(trunk.blocks):
            x = runner(index, block, x)
            if index in wanted:
                found[index] = x.permute(0, 3, 1, 2)
            if index == last or (index in trunk.stage_ends and trunk.return_interm_layers):
                stages.append(x.permute(0, 3, 1, 2))
        levels, pos = encoder.neck(stages)
        if encoder.scalp > 0:
            levels, pos = levels[: -encoder.scalp], pos[: -encoder.scalp]
        return list(levels), list(pos), found

    def forward_features(self, x: torch.Tensor, layers: Sequence[int] = ()) -> BackboneOutput:
        """Run Hiera and the neck on ``(B, 3, H, W)``, already normalised; other sides than multiples of 32 are
        padded (module docstring)."""
        wanted = _select_blocks(layers, self.num_blocks)
        height, width = x.shape[-2:]
        multiple = self.size_multiple
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        levels, _, found = self._run(x, wanted)

        def crop(t: torch.Tensor, stride: int) -> torch.Tensor:
            return t[..., : math.ceil(height / stride), : math.ceil(width / stride)]

        return BackboneOutput(
            features=crop(levels[-1], self.patch_size),
            intermediates=[crop(found[i], self.block_strides[i]) for i in wanted],
        )

    def encode(self, x: torch.Tensor) -> dict[str, Any]:
        """``sam2``'s ``ImageEncoder`` output for an image in ``input_spec.value_range`` with ``in_channels``.

        Returns:
            ``{"vision_features": (B, 256, H/16, W/16), "vision_pos_enc": [...], "backbone_fpn": [...]}`` with the FPN
            levels at strides 4, 8 and 16, as ``SAM2Base.forward_image`` gets them from its encoder.

        Raises:
            InputShapeError: a side is not a multiple of :attr:`size_multiple` (the promptable path runs at the
                model's square input size).
        """
        height, width = x.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise InputShapeError(
                f"SAM 2 encodes images whose sides are multiples of {self.size_multiple} pixels, got "
                f"{height}x{width}; resize to the model's {self.input_spec.image_size} px first."
            )
        levels, pos, _ = self._run(self.standardise(self.channel_adapter(x)))
        return {"vision_features": levels[-1], "vision_pos_enc": pos, "backbone_fpn": levels}


def _select_blocks(layers: Sequence[int], num_blocks: int) -> list[int]:
    out = []
    for layer in layers:
        index = layer + num_blocks if layer < 0 else layer
        if not 0 <= index < num_blocks:
            raise IndexError(f"block index {layer} out of range for a backbone with {num_blocks} blocks")
        out.append(index)
    return out


def prepare_image_features(model: nn.Module, encoded: Mapping[str, Any]) -> Sam2ImageFeatures:
    """The mask decoder's inputs from an encoder output, exactly as ``SAM2ImagePredictor.set_image`` makes them.

    Args:
        model: the ``SAM2Base`` (:attr:`Sam2Components.model`).
        encoded: :meth:`Sam2Backbone.encode` (or ``ImageEncoder``) output.
    """
    levels = list(encoded["backbone_fpn"])
    high_res: list[torch.Tensor] = []
    if model.use_high_res_features_in_sam:
        high_res = [model.sam_mask_decoder.conv_s0(levels[0]), model.sam_mask_decoder.conv_s1(levels[1])]
    embed = levels[-1]
    if model.directly_add_no_mem_embed:
        embed = embed + model.no_mem_embed.reshape(1, -1, 1, 1)
    return Sam2ImageFeatures(embed, high_res)


def decode_sam2_masks(
    prompt_encoder: nn.Module,
    mask_decoder: nn.Module,
    features: Sam2ImageFeatures,
    boxes: torch.Tensor | None = None,
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
    masks: torch.Tensor | None = None,
    multimask_output: bool = False,
) -> Sam2Masks:
    """SAM 2's prompt-to-mask path (``SAM2ImagePredictor._predict``) for a batch of images, one prompt set each.

    A box is two corner points with labels 2 and 3 placed before the clicks, as SAM 2 encodes it; with no box and no
    click, a padding point (label -1) stands in, as in ``SAM2Base._forward_sam_heads``.

    Args:
        features: :func:`prepare_image_features` of the batch.
        boxes: ``(B, 4)`` or ``(B, 1, 4)`` ``x0, y0, x1, y1`` in pixels of the model input.
        points: ``(coords (B, N, 2) in pixels (x, y), labels (B, N))``, 1 positive, 0 negative.
        masks: ``(B, 1, H/4, W/4)`` low-resolution mask logits of a previous step.
        multimask_output: three masks (``True``) or one.
    """
    embed = features.image_embed
    batch = embed.shape[0]
    coords = labels = None
    if boxes is not None:
        coords = boxes.reshape(batch, 2, 2).to(embed.dtype)
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=embed.device).repeat(batch, 1)
    if points is not None:
        point_coords, point_labels = points[0].to(embed.dtype), points[1].to(torch.int)
        coords = point_coords if coords is None else torch.cat([coords, point_coords], dim=1)
        labels = point_labels if labels is None else torch.cat([labels, point_labels], dim=1)
    if coords is None:
        coords = torch.zeros(batch, 1, 2, dtype=embed.dtype, device=embed.device)
        labels = -torch.ones(batch, 1, dtype=torch.int, device=embed.device)
    sparse, dense = prompt_encoder(points=(coords, labels), boxes=None, masks=masks)
    logits, iou, tokens, objects = mask_decoder(
        image_embeddings=embed,
        image_pe=prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        repeat_image=False,
        high_res_features=features.high_res_feats or None,
    )
    return Sam2Masks(logits, iou, tokens, objects)


def _make_builder(name: str):
    model = SAM2_MODELS[name]

    def build(
        checkpoint: Path | None,
        in_channels: int = 1,
        channel_mode: str = "repeat",
        img_size: int | None = None,
        arch: Mapping[str, Any] | None = None,
        attention: str = "fused",
        activation_checkpointing: bool | int | str | None = "none",
    ) -> Sam2Backbone:
        """Build the ``name`` encoder; ``checkpoint=None`` is the scratch twin."""
        check_attention_mode(attention)
        encoder = build_sam2_image_encoder(name, img_size, arch)
        if checkpoint is not None:
            _load_encoder(encoder, checkpoint, model.filename)
        return Sam2Backbone(
            encoder, name=name, image_size=img_size or model.image_size, in_channels=in_channels,
            channel_mode=channel_mode, attention=attention, activation_checkpointing=activation_checkpointing,
        )  # fmt: skip

    build.__name__ = f"build_{name}"
    return build


_BUILDERS = {name: _make_builder(name) for name in SAM2_MODELS}
for _name, _model in SAM2_MODELS.items():
    register_backbone(BackboneEntry(_name, "sam2", _BUILDERS[_name], _model.filename, _model.url))
for _alias, _name in SAM2_ALIASES.items():
    _model = SAM2_MODELS[_name]
    register_backbone(BackboneEntry(_alias, "sam2", _BUILDERS[_name], _model.filename, _model.url))
