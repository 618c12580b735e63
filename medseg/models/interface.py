"""The one interface every segmentation model honours, ViT segmenter and MONAI baseline alike.

The training module (:mod:`medseg.tasks.segmentation`) and the inference code only ever use what is written here, so a
new model family needs no change there.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["SegmentationModel"]


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
