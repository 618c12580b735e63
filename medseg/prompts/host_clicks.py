"""The correction clicks of :class:`medseg.prompts.ClickSimulator` for a whole batch at once, with scipy on the host.

Interactive training asks, every round, for one correction click per object of the batch. The reference
(:meth:`ClickSimulator.next_click`) labels two full error maps and runs a distance transform on the full array for each
object in turn; on a 256 x 256 slice that is milliseconds per object and was most of the promptable task's data path
on a CPU (issue 17). Here the same rules give the same clicks with far less work:

- *one labelling for the batch*: the ``2B`` error maps (missed, false positive, per item), each cropped to the rows
  and columns that hold an error, are stacked along the first axis with one empty slab after each, and labelled by a
  single :func:`scipy.ndimage.label` call. An empty slab keeps every connectivity from joining two maps, and scipy
  numbers components by their first voxel in C order, which a vertical stack keeps within each map: the regions come
  in the reference's order (largest, then missed before false positive, then first voxel). Sizes come from one
  :func:`numpy.bincount` and bounding boxes from one :func:`scipy.ndimage.find_objects`.
- *the distance transform on the chosen region's box only*: the region zero-padded by one voxel around its bounding
  box. The nearest voxel outside a region touches it by a face (a step from a farther one toward the region finds a
  nearer one), and every such voxel lies in the padded box, so each distance equals the reference's (full array,
  zero-padded), whose argmax in C order is the box's argmax, the distance being 0 outside the region.

The clicks are the reference's except where two voxels are at exactly the same distance in real numbers and float
rounding of a non-integer spacing separates them (as for :mod:`medseg.prompts.device_clicks`). On a CPU this is the
fastest of the three implementations (``tools/bench_clicks.py``); on a GPU the device one avoids the copies to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from medseg.prompts.contract import PromptError
from medseg.prompts.simulate import binary_mask, voxel_spacing

__all__ = ["correction_clicks"]

Click = tuple[tuple[int, ...], int]


def _extent(occupied: np.ndarray) -> tuple[int, int]:
    """First and one-past-last True index of a 1-D array (``(0, 0)`` when none)."""
    where = np.flatnonzero(occupied)
    return (int(where[0]), int(where[-1]) + 1) if len(where) else (0, 0)


def _stack(errors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[slice, ...]]:
    """The error maps ``[M, *spatial]`` as one array to label: each map's occupied rows, then one empty row.

    Returns ``(stack, offsets, first, columns)``: map ``m``'s rows ``first[m]...`` start at row ``offsets[m]`` of the
    stack; ``columns`` is the crop of the other axes that every map shares (the union of their occupied indices).
    """
    others = tuple(range(2, errors.ndim))
    rows = errors.any(axis=others) if others else errors  # [M, S0]
    columns = tuple(
        slice(*_extent(errors.any(axis=tuple(a for a in range(errors.ndim) if a != axis)))) for axis in others
    )
    extents = np.array([_extent(r) for r in rows]).reshape(-1, 2)
    heights = extents[:, 1] - extents[:, 0] + 1  # one empty row after each map
    offsets = np.concatenate([[0], np.cumsum(heights)[:-1]])
    stack = np.zeros((int(heights.sum()), *(c.stop - c.start for c in columns)), dtype=bool)
    for m, ((lo, hi), offset) in enumerate(zip(extents.tolist(), offsets.tolist())):
        if hi > lo:
            stack[offset : offset + hi - lo] = errors[(m, slice(lo, hi), *columns)]
    return stack, offsets, extents[:, 0], columns


def _distance(region: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) from each voxel of ``region`` (its box) to the nearest voxel outside it, as the reference's."""
    padded = np.pad(region, 1)
    return ndimage.distance_transform_edt(padded, sampling=spacing)[tuple(slice(1, -1) for _ in region.shape)]


def _centre(distance: np.ndarray, exclude: Sequence[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The voxel of largest ``distance`` (first in C order), skipping ``exclude`` (box indices); ``None`` if all 0."""
    inside = [coord for coord in exclude if all(0 <= c < n for c, n in zip(coord, distance.shape))]
    if inside:
        distance = distance.copy()
        for coord in inside:
            distance[coord] = 0.0
    flat = int(np.argmax(distance))
    if distance.flat[flat] <= 0:
        return None
    return tuple(int(v) for v in np.unravel_index(flat, distance.shape))


def correction_clicks(
    gt: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    previous_clicks: Sequence[Sequence[Sequence[int]]] | None = None,
    spacing: Sequence[float] | None = None,
    connectivity: int = 1,
    avoid_repeats: bool = True,
    memo: dict[int, tuple] | None = None,
) -> list[Click | None]:
    """Per item, :meth:`ClickSimulator.next_click`'s click: the centre of the largest error region of its prediction.

    Args:
        gt: ``[B, *spatial]`` reference masks (bool, integer, or float thresholded at 0.5), 2-D or 3-D.
        pred: ``[B, *spatial]`` current predictions, same rules and shape.
        previous_clicks: per item, the voxel indices of the clicks already given (never clicked again when
            ``avoid_repeats``; indices outside the array are ignored).
        spacing: voxel size in mm along each spatial axis (default isotropic 1 mm).
        connectivity: neighbourhood of the error regions: 1 = faces only, ``ndim`` = faces, edges and corners.
        avoid_repeats: skip the voxels of ``previous_clicks``.
        memo: a dict kept across the rounds of one batch (e.g. by :class:`~medseg.tasks.prompt_sampling.ClickState`):
            per item, the last region measured and its distances, reused when the next round's region is the same
            voxels (a model that ignored a click: with ``avoid_repeats`` the next click goes to the next-best voxel of
            the same region, without a second distance transform).

    Returns:
        Per item ``(coord, label)`` (array indices; label 1 for a missed region, 0 for a false positive one) or
        ``None`` when its prediction is perfect or every error voxel was already clicked.
    """
    target, current = binary_mask(gt, "gt", batched=True), binary_mask(pred, "pred", batched=True)
    if target.shape != current.shape:
        raise PromptError(f"gt {target.shape} and pred {current.shape} must have the same shape.")
    batch, shape = target.shape[0], target.shape[1:]
    spacing = voxel_spacing(spacing, len(shape))
    if not 1 <= int(connectivity) <= len(shape):
        raise PromptError(f"connectivity must be 1..{len(shape)} for {len(shape)}-D masks, got {connectivity}.")
    previous = [list(p) for p in previous_clicks] if previous_clicks is not None else [[] for _ in range(batch)]
    if len(previous) != batch:
        raise PromptError(f"previous_clicks must hold one list of clicks per item ({batch}), got {len(previous)}.")
    errors = np.empty((batch, 2, *shape), dtype=bool)  # per item: missed (positive click), false positive (negative)
    np.greater(target, current, out=errors[:, 0])
    np.greater(current, target, out=errors[:, 1])
    stack, offsets, first, columns = _stack(errors.reshape(batch * 2, *shape))
    structure = ndimage.generate_binary_structure(len(shape), int(connectivity))
    labels, count = ndimage.label(stack, structure=structure)
    clicks: list[Click | None] = [None] * batch
    if not count:
        return clicks
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    boxes = ndimage.find_objects(labels)
    maps = np.searchsorted(offsets, [box[0].start for box in boxes], side="right") - 1
    items, missed = maps // 2, maps % 2 == 0
    # the reference's order per item: largest first, a missed region before a false positive one, then first voxel
    order = np.lexsort((np.arange(count), ~missed, -sizes, items))
    bounds = np.searchsorted(items[order], np.arange(batch + 1))
    for b in range(batch):
        exclude = [tuple(int(c) for c in coord) for coord in previous[b]] if avoid_repeats else []
        for region in order[bounds[b] : bounds[b + 1]].tolist():
            box, m = boxes[region], int(maps[region])
            # the box in image indices: rows back from the stack, the other axes from the shared crop
            lo = (
                box[0].start - int(offsets[m]) + int(first[m]),
                *(s.start + c.start for s, c in zip(box[1:], columns)),
            )
            mask = labels[box] == region + 1
            known = memo.get(b) if memo is not None else None
            if known is not None and known[0] == lo and np.array_equal(known[1], mask):
                distance = known[2]  # the same region as in the item's last round: the same distances
            else:
                distance = _distance(mask, spacing)
                if memo is not None:
                    memo[b] = (lo, mask, distance)
            centre = _centre(distance, [tuple(c - o for c, o in zip(coord, lo)) for coord in exclude])
            if centre is not None:
                clicks[b] = (tuple(o + c for o, c in zip(lo, centre)), 1 if missed[region] else 0)
                break
    return clicks
