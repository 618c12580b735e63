"""A voxel-to-world affine as napari layer transforms, and back.

napari places a layer in world space with ``world = rotate @ diag(scale) @ index + translate`` (then its own
``affine``, left at identity here). A NIfTI / MONAI affine ``A`` (RAS+ mm) factors exactly that way: the column norms
of ``A[:3, :3]`` are the voxel spacings (mm, always positive), the normalised columns are the direction cosines (a
rotation, or a rotation with a flip: napari accepts both) and ``A[:3, 3]`` is the origin, the world position of voxel
``(0, 0, 0)``. Every layer the plugin creates for an image (prompts, labels) gets the same three values, so their data
coordinates are the image's voxel indices and they line up with it and with any other scan of the same patient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medseg.errors import ReaderError

__all__ = ["affine_from_layer", "layer_transform", "metadata_affine", "sliced_data_axis"]


def _as_affine(affine: Any) -> np.ndarray:
    array = np.asarray(getattr(affine, "detach", lambda: affine)(), dtype=np.float64)
    if array.shape != (4, 4) or not np.all(np.isfinite(array)):
        raise ReaderError(f"a voxel-to-world affine must be a finite 4x4 matrix, got {array.shape}: fix the header.")
    return array


def layer_transform(affine: Any) -> dict[str, np.ndarray]:
    """napari ``scale`` (spacing, mm), ``translate`` (origin, mm) and ``rotate`` (direction cosines) of an affine.

    Raises:
        ReaderError: the affine is not 4x4 and finite, or a column is zero (a degenerate header).
    """
    affine = _as_affine(affine)
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ReaderError(f"the affine has a zero column (spacing {spacing.tolist()}): the header is degenerate.")
    return {"scale": spacing, "translate": affine[:3, 3].copy(), "rotate": linear / spacing}


def affine_from_layer(
    scale: Sequence[float],
    translate: Sequence[float],
    rotate: Any = None,
    affine: Any = None,
) -> np.ndarray:
    """The 4x4 voxel-to-world affine of a 3-D layer from napari's transform values (the inverse of
    :func:`layer_transform`), including a non-identity napari ``affine`` applied after them."""
    linear = np.eye(3) if rotate is None else np.asarray(rotate, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = linear @ np.diag(np.asarray(scale, dtype=np.float64))
    out[:3, 3] = np.asarray(translate, dtype=np.float64)
    if affine is not None:
        extra = np.asarray(getattr(affine, "affine_matrix", affine), dtype=np.float64)
        out = extra @ out
    return out


def sliced_data_axis(rotate: Any, world_axis: int) -> int:
    """The data axis that napari's slider over ``world_axis`` walks through: the one whose direction cosine points
    most along that world axis (exact for the axis-aligned affines of most scans, flips included)."""
    rotation = np.eye(3) if rotate is None else np.asarray(rotate, dtype=np.float64)
    return int(np.argmax(np.abs(rotation[world_axis])))


def metadata_affine(metadata: Mapping[str, Any] | None) -> np.ndarray | None:
    """The ``affine`` the reader stored in a layer's metadata, or ``None``."""
    if not metadata or metadata.get("affine") is None:
        return None
    return _as_affine(metadata["affine"])
