"""The interfaces every model honours: dense segmenters (ViT segmenter and MONAI baseline alike) and 2-D promptable
models (SAM / LiteMedSAM / DINOv2 / MAE with SAM's decoder, SAM 2 / MedSAM2).

The training modules (:mod:`medseg.tasks.segmentation`, :mod:`medseg.tasks.promptable`) and the inference code only
ever use what is written here, so a new model family needs no change there. :func:`sam_prompt_inputs` is the one place
where the prompt contract's array order becomes SAM's ``(x, y)`` order: SAM and SAM 2 share their prompt encoder's
conventions, so both promptable models translate prompts with it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from medseg.errors import InputShapeError
from medseg.prompts.contract import Prompts

__all__ = ["PromptableModel", "SegmentationModel", "sam_prompt_inputs"]


@runtime_checkable
class SegmentationModel(Protocol):
    """A dense multi-class segmenter.

    Attributes:
        spatial_dims: 2 (trains on slices ``(B, C, H, W)``; volumes are predicted slice by slice) or 3 (trains on
            patches ``(B, C, X, Y, Z)``; volumes are predicted by sliding window).
        num_classes: output channels, background included.
        in_channels: image channels (modalities).
    """

    spatial_dims: int
    num_classes: int
    in_channels: int

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, *spatial)`` of the input's spatial size, from an image normalised by the data
        pipeline (CT: HU window scaled to [0, 1]; MRI: z-score or [0, 1]); the model maps it to its own convention."""
        ...

    def param_groups(
        self,
        lr: float,
        backbone_lr_scale: float = 0.1,
        layer_decay: float | None = None,
        weight_decay: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Torch optimizer parameter groups of the trainable parameters (see :mod:`medseg.models.param_groups`)."""
        ...

    def trainable_report(self) -> dict[str, Any]:
        """Trainable and total parameter counts, overall and per group (``backbone``, ``adapters``, ``decoder``)."""
        ...


@runtime_checkable
class PromptableModel(Protocol):
    """A 2-D promptable model: the heavy encoder runs once per slice, the decoder once per prompt set.

    Every 2-D promptable path (click training, interactive evaluation, slice propagation, ``medseg predict``, napari)
    uses only this, so a model that honours it works everywhere. Embeddings are one tensor with the batch first, so
    that they can be sliced, batched and cached (:mod:`medseg.inference.cache`) without knowing what they hold.

    Attributes:
        spatial_dims: 2.
        image_size: square model-input side in pixels.
        in_channels: image channels :meth:`encode` takes.
    """

    spatial_dims: int
    image_size: int
    in_channels: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, E, h, w)`` of ``(B, C, S, S)`` model-input images in [0, 1] (or z-scores)."""
        ...

    def decode(
        self, embeddings: torch.Tensor, prompts: Prompts, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, M, S, S), iou (B, M))`` for one 2-D prompt set per embedding, ``M`` 3 if ``multimask``."""
        ...

    def encoder_modules(self) -> dict[str, torch.nn.Module]:
        """The modules an embedding depends on (hashed by the embedding cache)."""
        ...


def _as_logits(mask: torch.Tensor) -> torch.Tensor:
    """SAM's mask input is logits; a previous mask given as probabilities (all values in [0, 1]) is converted."""
    if mask.min() >= 0 and mask.max() <= 1:
        mask = mask.clamp(1e-4, 1 - 1e-4)
        return torch.log(mask / (1 - mask))
    return mask


def sam_prompt_inputs(
    prompts: Prompts, mask_size: tuple[int, int]
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None, torch.Tensor | None]:
    """Translate contract prompts (array order) into SAM's ``points, boxes, masks`` arguments ((x, y) order).

    Args:
        prompts: 2-D prompts in model-input pixels.
        mask_size: ``(4h, 4w)`` size of SAM's low-resolution mask input; ``prev_mask`` is resized to it bilinearly.

    Returns:
        ``((coords (B, N, 2) as x, y; labels (B, N)) or None, boxes (B, 4) as x0, y0, x1, y1 or None,
        masks (B, 1, 4h, 4w) logits or None)``.
    """
    if prompts.spatial_dims not in (None, 2):
        raise InputShapeError(
            f"a 2-D promptable model takes 2-D prompts ([B, N, 2] points, [B, 4] boxes), got {prompts.spatial_dims}-D "
            f"ones; slice 3-D prompts first (medseg.inference.propagate does this along its axis)."
        )
    points = None
    if prompts.point_coords is not None:
        points = (prompts.point_coords.flip(-1), prompts.point_labels)
    boxes = None if prompts.box is None else prompts.box[:, [1, 0, 3, 2]]
    masks = None
    if prompts.prev_mask is not None:
        masks = _as_logits(prompts.prev_mask.float())
        if tuple(masks.shape[-2:]) != tuple(mask_size):
            masks = F.interpolate(masks, size=mask_size, mode="bilinear", align_corners=False)
    if points is None and boxes is None and masks is None:
        raise InputShapeError("the promptable model needs points, a box or a previous mask; class_vector alone is not.")
    return points, boxes, masks
