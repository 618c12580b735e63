"""napari prompt layers (Points, Shapes) -> the 2-D prompts of one slice, in the slice's array order.

The plugin gives its prompt layers the image's transform (:mod:`medseg.napari.geometry`), so their data are voxel
indices of the image, continuous (``10.4`` lies within voxel 10). A rectangle drawn in a 2-D view of a 3-D volume is
four vertices that share one coordinate on the sliced axis; a point has three coordinates. Both are turned into the
inclusive ``(i0, j0, i1, j1)`` box and ``(i, j)`` points of :func:`medseg.inference.recipe.segment_slice` on that
slice (axes other than ``axis``, in order), positive points labelled 1 and negative ones 0 (the Prompts contract).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.prompts.contract import PromptError

__all__ = ["POINT_KINDS", "box_on_slice", "boxes_on_slice", "point_labels", "points_on_slice"]

POINT_KINDS = ("positive", "negative")  # the values of the points layer's "prompt" feature; label 1 and 0


def _in_plane(axis: int) -> list[int]:
    return [a for a in range(3) if a != axis]


def box_on_slice(
    vertices: Any, axis: int, shape: Sequence[int] | None = None
) -> tuple[int, tuple[int, int, int, int]] | None:
    """The slice index and inclusive 2-D box of a rectangle's ``(4, 3)`` vertices, or ``None`` when the rectangle
    is not flat along ``axis`` (drawn in another view). ``shape`` (the volume's) clips the box to the slice."""
    corners = np.asarray(vertices, dtype=np.float64)
    if corners.ndim != 2 or corners.shape[1] != 3:
        raise PromptError(f"a box must be the (N, 3) vertices of a rectangle on a 3-D volume, got {corners.shape}.")
    along = corners[:, axis]
    if np.ptp(along) > 0.5:
        return None
    index = int(np.rint(along.mean()))
    plane = _in_plane(axis)
    lo = np.rint(corners[:, plane].min(axis=0)).astype(int)
    hi = np.rint(corners[:, plane].max(axis=0)).astype(int)
    if shape is not None:
        top = np.asarray([shape[a] - 1 for a in plane])
        lo, hi = np.clip(lo, 0, top), np.clip(hi, 0, top)
    return index, (int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))


def boxes_on_slice(
    shapes: Sequence[Any], axis: int, index: int, shape: Sequence[int] | None = None
) -> list[tuple[int, int, int, int]]:
    """The 2-D boxes among a Shapes layer's ``data`` that lie on slice ``index`` along ``axis`` (drawing order)."""
    found = []
    for vertices in shapes:
        box = box_on_slice(vertices, axis, shape)
        if box is not None and box[0] == index:
            found.append(box[1])
    return found


def point_labels(kinds: Sequence[str] | None, count: int) -> list[int]:
    """Contract labels (1 positive, 0 negative) of a points layer's ``prompt`` feature; all positive without it."""
    if kinds is None:
        return [1] * count
    labels = []
    for kind in kinds:
        if kind not in POINT_KINDS:
            raise PromptError(f"point prompt kind must be one of {POINT_KINDS}, got {kind!r}.")
        labels.append(1 if kind == "positive" else 0)
    return labels


def points_on_slice(
    points: Any, labels: Sequence[int], axis: int, index: int
) -> tuple[list[tuple[float, float]], list[int]]:
    """The ``(i, j)`` points (and their labels) among ``(N, 3)`` voxel coordinates that lie on slice ``index``."""
    coords = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(labels) != len(coords):
        raise PromptError(f"{len(coords)} points but {len(labels)} labels; give one label per point.")
    plane = _in_plane(axis)
    keep = np.rint(coords[:, axis]).astype(int) == index
    chosen = [(float(p[plane[0]]), float(p[plane[1]])) for p in coords[keep]]
    return chosen, [int(v) for v, k in zip(labels, keep) if k]
