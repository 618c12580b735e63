"""The simulated user of promptable training: per-item click lists, correction clicks, mask choice and model inputs.

A training batch starts from :func:`medseg.prompts.sample_prompts` (one object per item, a box and/or clicks drawn
from the prompt mix). :class:`ClickState` then holds each item's clicks across the rounds of the iterative loop and
adds, per round, the click a user would give: at the centre of the largest error region of the current prediction
(:class:`medseg.prompts.ClickSimulator`, positive in a missed region, negative in a false positive one), as SAM,
SAM-Med2D and RITM train. Everything here is dimension-agnostic (2-D slices or 3-D patches). The conventions shared
with inference (per-image min-max input, SAM's single-click multi-mask rule) live in :mod:`medseg.inference.recipe`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Resize, SpatialPad

from medseg.prompts.contract import Prompts, pad_points
from medseg.prompts.simulate import ClickSimulator

__all__ = ["ClickState", "fit_to_model", "mask_iou", "pick_masks"]


def fit_to_model(image: torch.Tensor, label: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, *spatial)`` image and label brought to the model input as the training sampler does it.

    The longest side is resized to ``size`` pixels (bilinear/trilinear for the image, nearest for the label) and the
    other sides zero-padded at their end (``conf/data/sampling/slices_2d.yaml``: MONAI ``Resized`` with
    ``size_mode="longest"`` and ``SpatialPadd`` with ``method="end"``).
    """
    ndim = image.ndim - 1
    image = Resize(size, size_mode="longest", mode="bilinear" if ndim == 2 else "trilinear")(image)
    label = Resize(size, size_mode="longest", mode="nearest")(label)
    pad = SpatialPad([size] * ndim, method="end")
    return torch.as_tensor(pad(image)), torch.as_tensor(pad(label))


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU ``(B, M)`` of each of ``M`` masks (``logits > 0``) with the binary ``target (B, 1, *spatial)``.

    Two empty masks agree perfectly (IoU 1), which is what the IoU head should predict for "nothing here".
    """
    pred = logits > 0
    ref = target > 0.5
    dims = tuple(range(2, logits.ndim))
    inter = (pred & ref).sum(dims).float()
    union = (pred | ref).sum(dims).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def pick_masks(per_mask_loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """SAM's multi-mask rule: per item, the mask ``(B, 1, *spatial)`` of lowest loss among ``per_mask_loss (B, M)``."""
    best = per_mask_loss.argmin(dim=1)
    return logits[torch.arange(logits.shape[0], device=logits.device), best][:, None]


class ClickState:
    """The clicks of every item of a batch across the rounds of interactive training.

    Args:
        prompts: the batch's first prompt set (from :func:`medseg.prompts.sample_prompts`); its real points (label
            >= 0) are each item's first clicks, its box and class vector are kept for every round.
        simulator: the correction-click rules (spacing in mm, connectivity).
    """

    def __init__(self, prompts: Prompts, simulator: ClickSimulator | None = None) -> None:
        self.box = prompts.box
        self.class_vector = prompts.class_vector
        self.simulator = simulator or ClickSimulator()
        batch = prompts.batch_size
        self.coords: list[list[tuple[float, ...]]] = [[] for _ in range(batch)]
        self.labels: list[list[int]] = [[] for _ in range(batch)]
        if prompts.point_coords is not None:
            for b in range(batch):
                real = prompts.point_labels[b] >= 0
                self.coords[b] = [tuple(c) for c in prompts.point_coords[b][real].tolist()]
                self.labels[b] = prompts.point_labels[b][real].tolist()
        self.dims = prompts.spatial_dims

    @property
    def batch_size(self) -> int:
        return len(self.coords)

    def counts(self) -> list[int]:
        """Real clicks per item."""
        return [len(c) for c in self.labels]

    def add_corrections(self, targets: np.ndarray, predictions: np.ndarray) -> int:
        """Add, per item, the click at the centre of the largest error of its prediction.

        Args:
            targets: ``(B, *spatial)`` boolean reference masks.
            predictions: ``(B, *spatial)`` boolean current predictions.

        Returns:
            How many items got a click (an item predicted perfectly gets none: there is nothing to correct).
        """
        added = 0
        for b in range(self.batch_size):
            previous = [(tuple(round(v) for v in c), lab) for c, lab in zip(self.coords[b], self.labels[b])]
            click = self.simulator.next_click(targets[b], predictions[b], previous)
            if click is None:
                continue
            coord, label = click
            self.coords[b].append(tuple(float(v) for v in coord))
            self.labels[b].append(int(label))
            added += 1
        return added

    def prompts(self, prev_mask: torch.Tensor | None, device: torch.device | str) -> Prompts:
        """The round's prompt set: the box (if any), every click so far (padded with -1) and the previous logits."""
        kwargs: dict[str, torch.Tensor | None] = {"box": self.box, "class_vector": self.class_vector}
        if any(self.labels):
            dims = self.dims or (prev_mask.ndim - 2 if prev_mask is not None else 2)
            coords: Sequence[np.ndarray] = [np.asarray(c, dtype=np.float32).reshape(-1, dims) for c in self.coords]
            kwargs["point_coords"], kwargs["point_labels"] = pad_points(coords, self.labels)
        kwargs["prev_mask"] = prev_mask
        return Prompts(**kwargs).to(device)
