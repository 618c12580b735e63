"""The clicks of :class:`medseg.prompts.ClickSimulator`, for a whole batch at once, on the masks' device.

Interactive training asks, every round, for one correction click per object of the batch. The reference
(:mod:`medseg.prompts.simulate`) copies each mask to the host and runs scipy on it, object after object; here the same
rules run as batched torch operations on the device that holds the masks (the model's), and only the click tensors
come out, still on that device:

- the first click goes to the voxel of the object farthest (mm) from its boundary, the volume border counting as
  boundary;
- a correction click goes to the same centre of the largest connected error region, false negatives (label 1) and
  false positives (label 0) labelled separately; at equal size a missed region comes first, then the region whose first
  voxel comes first in C order (scipy's label order); with ``avoid_repeats`` the voxels of earlier clicks are never
  clicked again (a region all of whose voxels were clicked is passed over);
- ties go to the first voxel in C order (:func:`torch.argmax` documents that it returns the first maximal index).

The distances and components come from :mod:`medseg.prompts.device_morphology` (exact, float64 by default), so the
clicks are those of the reference except where two voxels are at exactly the same distance in real numbers and the
reference's float rounding prefers the later one. Masks are ``[B, *spatial]`` (2-D or 3-D); an item without an
object, or with nothing left to correct, gets ``valid`` False, label -1 (the padding label of
:class:`medseg.prompts.Prompts`) and coordinates 0, instead of the reference's error or ``None``.

Nothing per object or per click goes to the host: the labelling reads back the sizes of two ``nonzero`` calls and
one convergence flag per round, a handful of scalars per call whatever the batch size. On a CPU the batched scipy
version (:mod:`medseg.prompts.host_clicks`) is the faster (``tools/bench_clicks.py``); this module is for masks that
already live on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from medseg.prompts.contract import PromptError
from medseg.prompts.device_morphology import distance_inside, label_components
from medseg.prompts.simulate import voxel_spacing

__all__ = ["DeviceClickSimulator", "correction_clicks", "first_clicks"]


def _as_masks(mask: torch.Tensor, name: str) -> torch.Tensor:
    """Boolean ``[B, *spatial]`` masks by the reference's rule: floats above 0.5, other types non-zero."""
    if not isinstance(mask, torch.Tensor):
        raise PromptError(
            f"{name} must be a torch tensor [B, *spatial] on the model's device, got {type(mask).__name__}."
        )
    if mask.ndim not in (3, 4):
        raise PromptError(f"{name} must be a batch of 2D or 3D masks [B, *spatial], got shape {tuple(mask.shape)}.")
    return mask > 0.5 if mask.is_floating_point() else mask != 0


def _unravel(flat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``[B]`` flat C-order indices to ``[B, len(shape)]`` array indices, on the device."""
    coords = []
    for n in reversed(shape):
        coords.append(flat % n)
        flat = flat // n
    return torch.stack(coords[::-1], dim=-1)


def _clicked(
    shape: Sequence[int],
    batch: int,
    coords: torch.Tensor | None,
    labels: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """``[B, V]`` True at the voxels of earlier clicks (coordinates rounded half to even, as ``ClickState`` does).

    Padding clicks (label < 0) and clicks outside the array are ignored.
    """
    size = math.prod(shape)
    clicked = torch.zeros(batch, size + 1, dtype=torch.bool, device=device)  # the extra slot takes ignored clicks
    if coords is None:
        return clicked[:, :size]
    coords = torch.as_tensor(coords, device=device)
    if coords.ndim != 3 or coords.shape[0] != batch or coords.shape[2] != len(shape):
        raise PromptError(
            f"previous_coords must be [B={batch}, K, {len(shape)}] click coordinates, got shape {tuple(coords.shape)}."
        )
    voxel = torch.round(coords.double()).long() if coords.is_floating_point() else coords.long()
    keep = torch.ones_like(voxel[..., 0], dtype=torch.bool)
    for axis, n in enumerate(shape):
        keep &= (voxel[..., axis] >= 0) & (voxel[..., axis] < n)
    if labels is not None:
        labels = torch.as_tensor(labels, device=device)
        if labels.shape != coords.shape[:2]:
            raise PromptError(f"previous_labels must be [B, K] = {tuple(coords.shape[:2])}, got {tuple(labels.shape)}.")
        keep &= labels >= 0
    flat = torch.zeros_like(voxel[..., 0])
    for axis, n in enumerate(shape):
        flat = flat * n + voxel[..., axis].clamp(0, n - 1)
    flat = torch.where(keep, flat, size)
    clicked.scatter_(1, flat, True)
    return clicked[:, :size]


def first_clicks(
    gt: torch.Tensor,
    spacing: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float64,
    max_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive click of each object at its interior point farthest (mm) from its boundary.

    Args:
        gt: ``[B, *spatial]`` object masks (bool, integer, or float thresholded at 0.5), 2-D or 3-D.
        spacing: voxel size in mm along each spatial axis (default isotropic 1 mm).
        dtype: float type of the distances (float64 reproduces the reference bit for bit).
        max_elements: memory bound of the distance transform's chunks (default by device, see
            :func:`medseg.prompts.device_morphology.distance_inside`).

    Returns:
        ``(coords [B, ndim] int64, valid [B] bool)`` on ``gt``'s device; ``valid`` is False (coords 0) for an empty
        object, where :meth:`ClickSimulator.first_click` raises.
    """
    target = _as_masks(gt, "gt")
    shape = tuple(target.shape[1:])
    distance = distance_inside(target, voxel_spacing(spacing, len(shape)), dtype, max_elements).flatten(1)
    valid = target.flatten(1).any(dim=1)
    coords = _unravel(distance.argmax(dim=1), shape)
    return torch.where(valid[:, None], coords, 0), valid


def correction_clicks(
    gt: torch.Tensor,
    pred: torch.Tensor,
    spacing: Sequence[float] | None = None,
    previous_coords: torch.Tensor | None = None,
    previous_labels: torch.Tensor | None = None,
    connectivity: int = 1,
    avoid_repeats: bool = True,
    dtype: torch.dtype = torch.float64,
    max_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The click of each object that corrects the largest error region of its prediction.

    Args:
        gt: ``[B, *spatial]`` reference masks (bool, integer, or float thresholded at 0.5), 2-D or 3-D.
        pred: ``[B, *spatial]`` current predictions, same rules and shape (e.g. ``logits[:, 0] > 0``).
        spacing: voxel size in mm along each spatial axis (default isotropic 1 mm).
        previous_coords: ``[B, K, ndim]`` clicks already given (voxel indices, floats rounded), e.g.
            ``Prompts.point_coords``; never clicked again when ``avoid_repeats``.
        previous_labels: ``[B, K]`` their labels; entries below 0 are padding and ignored (``Prompts.point_labels``).
        connectivity: neighbourhood of the error regions: 1 = faces only, ``ndim`` = faces, edges and corners.
        avoid_repeats: skip the voxels of ``previous_coords`` (the reference's ``avoid_repeats``).
        dtype: float type of the distances (float64 reproduces the reference bit for bit).
        max_elements: memory bound of the distance transform's chunks (default by device, see
            :func:`medseg.prompts.device_morphology.distance_inside`).

    Returns:
        ``(coords [B, ndim] int64, labels [B] int64, valid [B] bool)`` on ``gt``'s device: label 1 for a missed
        region, 0 for a false positive one; ``valid`` False (label -1, coords 0) where nothing is left to correct.
    """
    target, current = _as_masks(gt, "gt"), _as_masks(pred, "pred")
    if target.shape != current.shape:
        raise PromptError(f"gt {tuple(target.shape)} and pred {tuple(current.shape)} must have the same shape.")
    batch, shape = target.shape[0], tuple(target.shape[1:])
    size = math.prod(shape)
    spacing = voxel_spacing(spacing, len(shape))
    if not 1 <= int(connectivity) <= len(shape):
        raise PromptError(f"connectivity must be 1..{len(shape)} for {len(shape)}-D masks, got {connectivity}.")
    device = target.device
    clicked = _clicked(shape, batch, previous_coords if avoid_repeats else None, previous_labels, device)
    errors = torch.stack([target & ~current, current & ~target], dim=1)  # [B, 2 (missed, false positive), *spatial]
    first = label_components(errors.reshape(batch * 2, *shape), int(connectivity)).view(batch, 2, size)
    inside = first >= 0
    slot = first.clamp_min(0)
    sizes = torch.zeros(batch, 2, size, dtype=torch.long, device=device).scatter_add_(2, slot, inside.long())
    open_ = torch.zeros_like(sizes).scatter_add_(2, slot, (inside & ~clicked[:, None]).long())
    position = torch.arange(size, device=device)
    missed = torch.arange(1, -1, -1, device=device)[:, None]  # 1 for the missed map, 0 for the false positives
    # the reference's order (largest, then missed before false positive, then label order = first voxel) as one key
    key = sizes * (2 * size) + missed * size + (size - 1 - position)
    key = torch.where((first == position) & (open_ > 0), key, -1).flatten(1)
    best_key, best = key.max(dim=1)
    valid = best_key >= 0
    kind, root = best // size, best % size
    region = first.gather(1, kind.view(batch, 1, 1).expand(batch, 1, size))[:, 0] == root[:, None]
    distance = distance_inside(region.view(batch, *shape), spacing, dtype, max_elements).flatten(1)
    distance = distance.masked_fill(clicked, 0)
    coords = torch.where(valid[:, None], _unravel(distance.argmax(dim=1), shape), 0)
    labels = torch.where(valid, 1 - kind, -1)
    return coords, labels, valid


class DeviceClickSimulator:
    """:class:`medseg.prompts.ClickSimulator`'s rules for batches on the device (same arguments).

    Args:
        spacing: voxel size in mm along each array axis (default isotropic 1 mm).
        connectivity: neighbourhood of the error components (1 = faces only).
        avoid_repeats: never click a voxel twice.
        dtype: float type of the distances; float64 (default) gives the reference's clicks, float32 is faster on
            GPUs with slow float64 and may break near-ties differently.
    """

    def __init__(
        self,
        spacing: Sequence[float] | None = None,
        connectivity: int = 1,
        avoid_repeats: bool = True,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.connectivity = int(connectivity)
        self.avoid_repeats = avoid_repeats
        self.dtype = dtype

    @classmethod
    def like(cls, simulator: object, dtype: torch.dtype = torch.float64) -> DeviceClickSimulator:
        """The device twin of a :class:`medseg.prompts.ClickSimulator` (its spacing, connectivity, avoid_repeats)."""
        return cls(simulator.spacing, simulator.connectivity, simulator.avoid_repeats, dtype)

    def first_clicks(self, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See :func:`first_clicks`."""
        return first_clicks(gt, self.spacing, self.dtype)

    def correction_clicks(
        self,
        gt: torch.Tensor,
        pred: torch.Tensor,
        previous_coords: torch.Tensor | None = None,
        previous_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See :func:`correction_clicks`."""
        return correction_clicks(
            gt, pred, self.spacing, previous_coords, previous_labels, self.connectivity, self.avoid_repeats, self.dtype
        )
