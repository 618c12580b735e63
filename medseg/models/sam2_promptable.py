"""``Sam2PromptableSegmenter``: SAM 2 / SAM 2.1 / MedSAM2 behind the 2-D promptable contract, and its memory.

The model honours :class:`~medseg.models.interface.PromptableModel` exactly as
:class:`~medseg.models.promptable.PromptableSegmenter` does (``encode`` once per slice, ``decode`` once per prompt set,
logits at the model-input size, predicted IoU, SAM's three masks on request), so iterative click training, the
interactive evaluation, slice propagation, ``medseg predict`` and napari run it unchanged. Its networks are ``sam2``'s
own: the whole ``SAM2Base`` is kept as :attr:`Sam2PromptableSegmenter.sam2` (memory attention, memory encoder, object
pointers), and the backbone (:class:`~medseg.backbones.sam2.Sam2Backbone`, where the adapters sit) wraps the very same
``image_encoder`` module, so one set of weights serves both.

Embedding. SAM 2's mask decoder reads more than the stride-16 image embedding: two high-resolution maps (strides 4 and
8, after its ``conv_s0``/``conv_s1`` projections). The promptable paths slice, batch and cache embeddings as one tensor,
so :meth:`~Sam2PromptableSegmenter.encode` packs all three onto the stride-16 grid without loss: the raw stride-16 FPN
level (``vision_features``, 256 channels), then the stride-4 map folded by :func:`torch.nn.functional.pixel_unshuffle`
(32 x 16 channels) and the stride-8 map (64 x 4), ``(B, 1024, S/16, S/16)`` for every SAM 2.1 size (16 MiB per slice
in float32 at 1024 px, 4 MiB at MedSAM2's 512). :meth:`~Sam2PromptableSegmenter.frame_features` unpacks it exactly.
The stride-16 part is kept without ``no_mem_embed``: :meth:`~Sam2PromptableSegmenter.decode` adds it (a frame without
memory, as ``SAM2ImagePredictor`` does), while the memory path conditions the raw features on earlier frames.

Memory. :meth:`~Sam2PromptableSegmenter.track` runs one frame through ``SAM2Base._track_step`` (memory-conditioned
features from ``_prepare_memory_conditioned_features`` on frames after the prompted one, then SAM's heads) and
:meth:`~Sam2PromptableSegmenter.remember` encodes its prediction into the memory bank with
``SAM2Base._encode_memory_in_output`` (``_encode_new_memory``): together they are ``SAM2Base.track_step``, split so that
training sees every candidate mask, its IoU and the object score, and so that the prompted frame can take correction
clicks (``prev_sam_mask_logits``, SAM 2's own iterative refinement) before its memory is written.

Parameters a training mode never uses. In 2-D frames (``decode``) the memory attention, memory encoder and
object-pointer heads get no gradient (the object-score head does:
:meth:`~Sam2PromptableSegmenter.decode_with_object_score` gives its logits, and the task trains them, because memory
propagation masks every slice the head calls absent); in sequences the mask-as-output path (``mask_downsample``) and,
with ``directly_add_no_mem_embed``, ``no_mem_pos_enc`` get none. DDP refuses parameters that receive no gradient, so
:meth:`~Sam2PromptableSegmenter.freeze_unused` freezes exactly those for the chosen mode (the promptable task calls it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medseg.backbones.sam2 import Sam2Backbone, Sam2ImageFeatures, build_sam2_components, decode_sam2_masks
from medseg.errors import ConfigError, InputShapeError
from medseg.models.interface import sam_prompt_inputs
from medseg.models.segmenter import apply_adapter_config
from medseg.prompts.contract import Prompts

__all__ = [
    "Sam2FrameFeatures",
    "Sam2Memory",
    "Sam2PromptableSegmenter",
    "Sam2Step",
    "build_sam2_promptable",
]

_ENCODER = "sam2.image_encoder."
_BACKBONE_ENCODER = "backbone.image_encoder."
# SAM2Base parts that 2-D frames never reach (memory, object pointers) and that sequences never reach (mask as output).
_MEMORY_ONLY = (
    "memory_attention", "memory_encoder", "maskmem_tpos_enc", "no_mem_pos_enc", "obj_ptr_proj", "obj_ptr_tpos_proj",
    "mask_downsample", "no_obj_ptr", "no_obj_embed_spatial",
)  # fmt: skip
_SEQUENCE_UNUSED = ("mask_downsample",)


class Sam2FrameFeatures(NamedTuple):
    """One packed embedding unpacked (:meth:`Sam2PromptableSegmenter.frame_features`).

    Attributes:
        vision: ``(B, 256, S/16, S/16)`` stride-16 FPN level, without ``no_mem_embed``.
        high_res: ``[(B, 32, S/4, S/4), (B, 64, S/8, S/8)]`` after ``conv_s0``/``conv_s1``; empty for a model without
            high-resolution features.
    """

    vision: torch.Tensor
    high_res: list[torch.Tensor]


@dataclass
class Sam2Memory:
    """SAM 2's memory bank of one tracked sequence (the ``output_dict`` of ``SAM2Base.track_step``).

    Attributes:
        num_frames: frames of the sequence (bounds the object pointers read).
        output_dict: ``{"cond_frame_outputs": {t: out}, "non_cond_frame_outputs": {t: out}}``.
    """

    num_frames: int
    output_dict: dict[str, dict[int, Any]] = field(
        default_factory=lambda: {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    )


class Sam2Step(NamedTuple):
    """One frame of :meth:`Sam2PromptableSegmenter.track`.

    Attributes:
        logits: every candidate mask at the model-input size ``(B, M, S, S)`` (``M`` 3 when SAM 2 asks for several).
        iou: predicted IoU ``(B, M)``.
        object_score_logits: ``(B, 1)`` whether the object is in the frame (masks of absent objects are set to
            SAM 2's ``NO_OBJ_SCORE``).
        output: SAM 2's frame output (``pred_masks``, ``pred_masks_high_res`` (the best mask), ``obj_ptr``, ...).
        vision_feats, feat_sizes: the frame's features in ``track_step``'s layout, for :meth:`~Sam2PromptableSegmenter.
            remember`.
    """

    logits: torch.Tensor
    iou: torch.Tensor
    object_score_logits: torch.Tensor
    output: dict[str, Any]
    vision_feats: list[torch.Tensor]
    feat_sizes: list[tuple[int, int]]


def _drop_shared_encoder(module: nn.Module, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
    """``sam2.image_encoder`` is ``backbone.image_encoder``: stored once (safetensors refuses shared tensors)."""
    for key in [k for k in state if k.startswith(prefix + _ENCODER)]:
        del state[key]


def _restore_shared_encoder(module: nn.Module, state: dict[str, Any], prefix: str, _metadata: Any, *_args: Any) -> None:
    """Give ``sam2.image_encoder`` the backbone's tensors on load (the keys :func:`_drop_shared_encoder` removed)."""
    for key in [k for k in state if k.startswith(prefix + _BACKBONE_ENCODER)]:
        state.setdefault(prefix + _ENCODER + key[len(prefix + _BACKBONE_ENCODER) :], state[key])


class Sam2PromptableSegmenter(nn.Module):
    """SAM 2's image encoder (with adapters), prompt encoder and mask decoder, and its memory for sequences.

    Attributes:
        backbone: :class:`~medseg.backbones.sam2.Sam2Backbone` around ``sam2.image_encoder`` (adapters inside).
        sam2: the whole ``SAM2Base`` (``sam2.modeling.sam2_base``).
        image_size: square model-input side in pixels (the ``SAM2Base``'s ``image_size``).
        input_range: ``unit``/``minmax`` ([0, 1] input) or ``zscore`` (``z -> z / 6 + 0.5`` first).
        adapter_names: backbone parameters trained by adapter methods.
    """

    spatial_dims = 2

    def __init__(
        self,
        backbone: Sam2Backbone,
        sam2: nn.Module,
        image_size: int,
        input_range: str = "unit",
        adapter_names: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        if input_range not in ("unit", "minmax", "zscore"):
            raise ConfigError(f"input_range must be unit, minmax or zscore, got {input_range!r}")
        if backbone.image_encoder is not sam2.image_encoder:
            raise ConfigError("the SAM 2 backbone must wrap sam2.image_encoder itself (one set of encoder weights).")
        if int(sam2.image_size) != int(image_size):
            raise ConfigError(f"image_size {image_size} differs from the SAM 2 model's {sam2.image_size} px.")
        self.backbone = backbone
        self.sam2 = sam2
        self.image_size = int(image_size)
        self.input_range = input_range
        self.adapter_names = set(adapter_names)
        self.compiled_mode: str | None = None
        self.register_state_dict_post_hook(_drop_shared_encoder)
        self.register_load_state_dict_pre_hook(_restore_shared_encoder)

    @property
    def prompt_encoder(self) -> nn.Module:
        """SAM 2's prompt encoder (``sam2.sam_prompt_encoder``; a view, not a second registration)."""
        return self.sam2.sam_prompt_encoder

    @property
    def mask_decoder(self) -> nn.Module:
        """SAM 2's mask decoder (``sam2.sam_mask_decoder``)."""
        return self.sam2.sam_mask_decoder

    @property
    def in_channels(self) -> int:
        """Image channels :meth:`encode` takes (the backbone's channel adapter maps them onto RGB)."""
        return self.backbone.channel_adapter.in_channels

    def encoder_modules(self) -> dict[str, nn.Module]:
        """What an embedding depends on: the backbone and the decoder's high-resolution projections it packs."""
        modules: dict[str, nn.Module] = {"backbone": self.backbone}
        if self.sam2.use_high_res_features_in_sam:
            modules |= {"conv_s0": self.mask_decoder.conv_s0, "conv_s1": self.mask_decoder.conv_s1}
        return modules

    # ------------------------------------------------------------------ the 2-D contract
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Packed embeddings ``(B, 1024, S/16, S/16)`` of ``(B, C, S, S)`` model-input images (module docstring)."""
        if images.ndim != 4 or tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise InputShapeError(
                f"encode takes (B, C, {self.image_size}, {self.image_size}) model-input images, got "
                f"{tuple(images.shape)}; bring slices there with medseg.inference.recipe.preprocess_slice."
            )
        x = images / 6.0 + 0.5 if self.input_range == "zscore" else images
        levels = self.backbone.encode(x)["backbone_fpn"]
        parts = [levels[-1]]
        if self.sam2.use_high_res_features_in_sam:
            side = levels[-1].shape[-1]
            for level, conv in zip(levels[:2], (self.mask_decoder.conv_s0, self.mask_decoder.conv_s1), strict=True):
                parts.append(F.pixel_unshuffle(conv(level), level.shape[-1] // side))
        return torch.cat(parts, dim=1)

    def frame_features(self, embeddings: torch.Tensor) -> Sam2FrameFeatures:
        """Unpack :meth:`encode`'s output into the stride-16 features and the high-resolution maps.

        Raises:
            InputShapeError: the channels are not those this model packs (an embedding of another model).
        """
        dim = int(self.sam2.hidden_dim)
        if not self.sam2.use_high_res_features_in_sam:
            widths, factors = [], []
        else:
            widths = [self.mask_decoder.conv_s0.out_channels, self.mask_decoder.conv_s1.out_channels]
            factors = [4, 2]
        expected = dim + sum(w * f * f for w, f in zip(widths, factors))
        if embeddings.ndim != 4 or embeddings.shape[1] != expected:
            raise InputShapeError(
                f"a SAM 2 embedding has {expected} channels (B, {expected}, S/16, S/16), got {tuple(embeddings.shape)};"
                f" compute it with this model's encode."
            )
        high_res, start = [], dim
        for width, factor in zip(widths, factors):
            stop = start + width * factor * factor
            high_res.append(F.pixel_shuffle(embeddings[:, start:stop], factor))
            start = stop
        return Sam2FrameFeatures(embeddings[:, :dim], high_res)

    def decode(
        self, embeddings: torch.Tensor, prompts: Prompts, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for one prompt set per embedding, as ``SAM2ImagePredictor`` predicts them on one image:
        ``(logits, iou)`` of :meth:`decode_with_object_score`."""
        logits, iou, _ = self.decode_with_object_score(embeddings, prompts, multimask)
        return logits, iou

    def decode_with_object_score(
        self, embeddings: torch.Tensor, prompts: Prompts, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`decode` plus SAM 2's object-score logits ``(B, 1)`` (is the object on this frame?), which 2-D
        training supervises so that memory propagation, which blanks frames scored absent, can use the model.

        Returns:
            ``(logits (B, M, S, S), iou (B, M))``, ``M`` 3 if ``multimask`` else 1: SAM 2's low-resolution logits
            upsampled bilinearly to the model-input size, as the predictor's ``return_logits`` masks.

        In inference (autograd off) the decoder runs outside any autocast in its weights' precision, as
        :meth:`medseg.models.promptable.PromptableSegmenter.decode` does.
        """
        if prompts.batch_size != embeddings.shape[0]:
            raise InputShapeError(f"{prompts.batch_size} prompt sets for {embeddings.shape[0]} embeddings.")
        mask_size = tuple(self.prompt_encoder.mask_input_size)
        points, boxes, masks = sam_prompt_inputs(prompts.to(embeddings.device), mask_size)
        if torch.is_grad_enabled():
            logits, iou, scores = self._decode(embeddings, points, boxes, masks, multimask)
        else:
            dtype = self.sam2.no_mem_embed.dtype
            with torch.autocast(embeddings.device.type, enabled=False):
                logits, iou, scores = self._decode(embeddings.to(dtype), points, boxes, masks, multimask)
        if logits.shape[-1] != self.image_size:
            logits = F.interpolate(logits, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return logits, iou, scores

    def _decode(self, embeddings, points, boxes, masks, multimask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frame = self.frame_features(embeddings)
        embed = frame.vision
        if self.sam2.directly_add_no_mem_embed:  # a frame without memory (SAM2ImagePredictor.set_image)
            embed = embed + self.sam2.no_mem_embed.reshape(1, -1, 1, 1)
        features = Sam2ImageFeatures(embed, frame.high_res)
        out = decode_sam2_masks(self.prompt_encoder, self.mask_decoder, features, boxes, points, masks, multimask)
        return out.logits, out.iou, out.object_score_logits

    def forward(
        self, images: torch.Tensor, prompts: Prompts, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode(encode(images), prompts, multimask)``."""
        return self.decode(self.encode(images), prompts, multimask)

    def click_decoder(self) -> None:
        """No restructured click decoder for SAM 2 (its decoder reads high-resolution maps): ``decode`` runs
        ``sam2``'s own modules."""
        return None

    def compile_decoder(self, mode: str | None = None, backend: str = "inductor") -> Sam2PromptableSegmenter:
        """Compile the prompt encoder and mask decoder in place (state-dict keys unchanged), as
        :meth:`medseg.models.promptable.PromptableSegmenter.compile_decoder` does."""
        device = next(self.mask_decoder.parameters()).device
        mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
        options = {"mode": mode} if backend == "inductor" else {}
        self.prompt_encoder.compile(backend=backend, **options)
        self.mask_decoder.compile(backend=backend, **options)
        self.compiled_mode = mode if backend == "inductor" else backend
        return self

    # ------------------------------------------------------------------ memory (sequences)
    def _frame_inputs(self, embeddings: torch.Tensor) -> tuple[list, list, list[tuple[int, int]]]:
        """The frame in ``SAM2Base._prepare_backbone_features``' layout: ``(HW, B, C)`` maps, their sine position
        encodings (the neck's own module) and sizes, high-resolution levels first."""
        frame = self.frame_features(embeddings)
        maps = [*frame.high_res, frame.vision]
        encode_position = self.sam2.image_encoder.neck.position_encoding
        pos = [encode_position(m).to(m.dtype) for m in maps]
        feats = [m.flatten(2).permute(2, 0, 1) for m in maps]
        return feats, [p.flatten(2).permute(2, 0, 1) for p in pos], [tuple(m.shape[-2:]) for m in maps]

    def _point_inputs(self, prompts: Prompts, device: torch.device) -> tuple[dict[str, torch.Tensor], Any]:
        """``SAM2Base``'s ``point_inputs`` (a box as two corner points labelled 2 and 3, before the clicks) and the
        previous mask logits of a prompt set."""
        points, boxes, masks = sam_prompt_inputs(prompts.to(device), tuple(self.prompt_encoder.mask_input_size))
        coords, labels = [], []
        if boxes is not None:
            coords.append(boxes.reshape(-1, 2, 2).float())
            labels.append(torch.tensor([[2, 3]], dtype=torch.int32, device=device).repeat(boxes.shape[0], 1))
        if points is not None:
            coords.append(points[0].float())
            labels.append(points[1].to(torch.int32))
        if not coords:
            raise InputShapeError("a tracked frame's prompts need clicks or a box; a previous mask alone is not one.")
        return {"point_coords": torch.cat(coords, 1), "point_labels": torch.cat(labels, 1)}, masks

    def track(self, embeddings: torch.Tensor, memory: Sam2Memory, frame_idx: int, prompts: Prompts | None = None):
        """One frame through ``SAM2Base._track_step`` (memory-conditioned unless it is the first prompted frame).

        Args:
            embeddings: :meth:`encode` of the frame, ``(B, 1024, S/16, S/16)``.
            memory: the sequence's memory bank (:meth:`remember` fills it).
            frame_idx: the frame's index in the sequence.
            prompts: the frame's 2-D prompts (clicks and/or a box, optionally ``prev_mask``, SAM 2's
                ``prev_sam_mask_logits``); ``None`` for a frame segmented from memory alone.

        Returns:
            :class:`Sam2Step`.
        """
        feats, pos, sizes = self._frame_inputs(embeddings)
        point_inputs = previous = None
        if prompts is not None:
            point_inputs, previous = self._point_inputs(prompts, embeddings.device)
        first = prompts is not None and not memory.output_dict["cond_frame_outputs"]
        output, heads, _, _ = self.sam2._track_step(
            frame_idx, first, feats, pos, sizes, point_inputs, None, memory.output_dict, memory.num_frames, False,
            previous,
        )  # fmt: skip
        _, high_res_multi, iou, low_res, high_res, obj_ptr, object_score = heads
        output.update(pred_masks=low_res, pred_masks_high_res=high_res, obj_ptr=obj_ptr)
        output["object_score_logits"] = object_score
        logits = high_res_multi
        if logits.shape[-1] != self.image_size:
            logits = F.interpolate(logits, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return Sam2Step(logits, iou, object_score, output, feats, sizes)

    def remember(self, memory: Sam2Memory, frame_idx: int, step: Sam2Step) -> None:
        """Encode ``step``'s best mask into the memory bank (``SAM2Base._encode_memory_in_output``); a prompted frame
        becomes a conditioning frame, the others non-conditioning ones (as in SAM 2's video predictor)."""
        output = step.output
        self.sam2._encode_memory_in_output(
            step.vision_feats, step.feat_sizes, output["point_inputs"], True, output["pred_masks_high_res"],
            step.object_score_logits, output,
        )  # fmt: skip
        kind = "cond_frame_outputs" if output["point_inputs"] is not None else "non_cond_frame_outputs"
        memory.output_dict[kind][frame_idx] = output

    def unused_parameters(self, sequence: bool, mask_prompts: bool = True) -> list[str]:
        """Names of the trainable parameters a training mode never reaches (module docstring).

        Args:
            sequence: frames tracked through memory (``True``) or 2-D frames decoded alone.
            mask_prompts: whether training feeds previous masks back (correction rounds); without them the prompt
                encoder's ``mask_downscaling`` is never used either.
        """
        parts = _SEQUENCE_UNUSED if sequence else _MEMORY_ONLY
        if sequence and self.sam2.directly_add_no_mem_embed:
            parts = (*parts, "no_mem_pos_enc")
        if not mask_prompts:
            parts = (*parts, "sam_prompt_encoder.mask_downscaling")
        prefixes = [f"sam2.{p}" for p in parts]

        def inside(name: str) -> bool:
            return any(name == p or name.startswith(p + ".") for p in prefixes)

        return [n for n, p in self.named_parameters() if p.requires_grad and inside(n)]

    def freeze_unused(self, sequence: bool, mask_prompts: bool = True) -> list[str]:
        """Freeze :meth:`unused_parameters` (DDP needs every trainable parameter to get a gradient); their names."""
        names = self.unused_parameters(sequence, mask_prompts)
        params = dict(self.named_parameters())
        for name in names:
            params[name].requires_grad_(False)
        return names


def build_sam2_promptable(
    backbone: str,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    in_channels: int = 1,
    adapter: Any = None,
    img_size: int | None = None,
    *,
    input_range: str = "unit",
    channel_mode: str = "repeat",
    arch: Mapping[str, Any] | None = None,
    attention: str = "fused",
    grad_checkpointing: bool | int | str = False,
) -> Sam2PromptableSegmenter:
    """A SAM 2 promptable model; ``pretrained`` (the ``init`` switch) changes initial weights only.

    Args:
        backbone: ``sam2_hiera_t/s/b_plus/l`` or ``medsam2``.
        pretrained: the official file (``sam2.1_hiera_*.pt``, ``MedSAM2_latest.pt``) loaded strictly into the whole
            ``SAM2Base``; ``False``: the same modules with ``sam2``'s initialisation.
        checkpoint: explicit path of that file; otherwise ``$MEDSEG_WEIGHTS``.
        in_channels, channel_mode: the image's channels and how they map onto RGB.
        adapter: an ``AdapterConfig``, a mapping of its arguments, or ``None`` (everything trains); adapters act on
            the Hiera image encoder, the prompt encoder and mask decoder train as for SAM.
        img_size: model-input side, a multiple of 32 (default the model's: 1024, MedSAM2 512).
        input_range: ``unit``/``minmax`` or ``zscore``.
        arch: Hiera overrides for tiny test models.
        attention, grad_checkpointing: the backbone's attention mode and activation checkpointing.
    """
    parts = build_sam2_components(backbone, pretrained, checkpoint, img_size=img_size, arch=arch)
    size = int(parts.model.image_size)
    net = Sam2Backbone(
        parts.image_encoder, name=backbone, image_size=size, in_channels=in_channels, channel_mode=channel_mode,
        attention=attention, activation_checkpointing=grad_checkpointing,
    )  # fmt: skip
    adapter_names = apply_adapter_config(net, adapter)
    return Sam2PromptableSegmenter(net, parts.model, size, input_range, adapter_names)
