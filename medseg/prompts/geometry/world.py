"""Native voxels <-> world millimetres (RAS+, and DICOM's LPS), and native voxels <-> a resampled grid, via the world.

- **voxel**: array indices of a volume as read (``mask[i, j, k]``); integers name voxel centres.
- **world**: RAS+ millimetres, ``world = A @ [i, j, k, 1]`` with the volume's 4x4 ``affine`` as in NIfTI and MONAI's
  MetaTensor (a DICOM series' LPS patient frame is converted by :func:`lps_to_ras`).
- **resampled grid**: a preprocessed MetaTensor (after Orientation, Spacing, crop) carries its own ``affine`` to the
  same world, so a native voxel goes native affine -> world -> the inverse of the preprocessed affine
  (:func:`voxel_to_model_input`), with no transform's parameters needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medseg.prompts.contract import PromptError

__all__ = [
    "box_voxel_to_world",
    "check_inside",
    "lps_to_ras",
    "lps_to_ras_affine",
    "model_input_to_voxel",
    "ras_to_lps",
    "voxel_spacing",
    "voxel_to_model_input",
    "voxel_to_world",
    "world_box_to_voxel",
    "world_to_voxel",
]

_FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])


def _points(values: object, width: int, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.shape[-1:] != (width,):
        raise PromptError(f"{name} must have {width} coordinates on its last axis, got shape {array.shape}.")
    return array


def _affine(affine: object) -> np.ndarray:
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise PromptError(f"an affine must be 4x4 (voxel -> RAS+ mm), got shape {matrix.shape}.")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise PromptError("the affine is singular (a zero voxel size or collinear axes); check the image header.")
    return matrix


def voxel_spacing(affine: object) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis: the norms of the affine's first three columns (right for oblique and
    permuted grids too, where the diagonal is not)."""
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(matrix, axis=0))  # type: ignore[return-value]


def check_inside(ijk: object, shape: Sequence[int], what: str = "prompt") -> None:
    """Raise :class:`PromptError` naming ``what`` and the volume shape unless every voxel index lies in ``shape``.

    Continuous indices count as inside up to half a voxel beyond the first and last voxel centres (the volume's
    outer faces).
    """
    array = _points(ijk, len(shape), what).reshape(-1, len(shape))
    upper = np.asarray(shape, dtype=np.float64) - 0.5
    outside = ((array < -0.5) | (array > upper)).any(-1)
    if outside.any():
        bad = [round(float(v), 2) for v in array[outside][0]]
        raise PromptError(
            f"{what} at voxel {bad} lies outside the volume of shape {tuple(int(s) for s in shape)} (valid indices "
            f"0..n-1 per axis). Check the axis order (array order of the input file) and, for world prompts, that "
            f"they are RAS+ millimetres (DICOM LPS coordinates need lps_to_ras)."
        )


def voxel_to_world(ijk: object, affine: object) -> np.ndarray:
    """World RAS+ coordinates (mm) of voxel indices: ``A @ [i, j, k, 1]``, for ``(..., 3)`` arrays."""
    points, matrix = _points(ijk, 3, "ijk"), _affine(affine)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def world_to_voxel(
    xyz: object,
    affine: object,
    round: bool = False,
    shape: Sequence[int] | None = None,
    what: str = "prompt",
) -> np.ndarray:
    """Voxel indices of world RAS+ points (mm), the inverse of :func:`voxel_to_world`.

    Args:
        xyz: ``(..., 3)`` world points in mm.
        affine: the volume's 4x4 voxel-to-world affine.
        round: return the nearest voxel (int64) instead of continuous indices (float64).
        shape: if given, the volume's shape; a point outside it raises :class:`PromptError` naming ``what``.
        what: how the error names the point (e.g. ``"object 2, point 0"``).
    """
    points, matrix = _points(xyz, 3, "xyz"), _affine(affine)
    ijk = np.linalg.solve(matrix[:3, :3], (points - matrix[:3, 3]).reshape(-1, 3).T).T.reshape(points.shape)
    if shape is not None:
        check_inside(ijk, shape, what)
    return np.rint(ijk).astype(np.int64) if round else ijk


def _corners(box: np.ndarray) -> np.ndarray:
    lo, hi = box[:3], box[3:]
    return np.array([[(lo, hi)[bit >> axis & 1][axis] for axis in range(3)] for bit in range(8)])


def box_voxel_to_world(box: object, affine: object) -> np.ndarray:
    """The world box ``(x0, y0, z0, x1, y1, z1)`` (mm, axis-aligned in RAS+) covering a voxel box's 8 corner centres.

    On an oblique grid a voxel box is a rotated block in the world; its axis-aligned cover is what a world-space
    prompt can express. :func:`world_box_to_voxel` maps it back to a voxel box that contains the original.
    """
    array = _points(box, 6, "box")
    world = voxel_to_world(_corners(array), affine)
    return np.concatenate([world.min(0), world.max(0)])


def world_box_to_voxel(
    box: object, affine: object, shape: Sequence[int] | None = None, what: str = "box", clip: bool = False
) -> np.ndarray:
    """The inclusive voxel box covering the 8 corners of a world box ``(x0, y0, z0, x1, y1, z1)`` (mm, RAS+).

    Each corner goes to its continuous voxel position; the box spans from the voxel holding the lowest corner to the
    voxel holding the highest, per axis, so every corner is inside it.

    Args:
        box: world box, any two opposite corners.
        affine: the volume's voxel-to-world affine.
        shape: the volume's shape, to check (or clip) the result.
        what: how errors name the box.
        clip: clip to the volume (an oblique box reaching a little outside) instead of raising; a box entirely
            outside still raises.

    Returns:
        ``(6,)`` int64 ``(i0, j0, k0, i1, j1, k1)``, inclusive.
    """
    array = _points(box, 6, "box")
    corners = np.concatenate([np.minimum(array[:3], array[3:]), np.maximum(array[:3], array[3:])])
    ijk = world_to_voxel(_corners(corners), affine)
    lo, hi = np.rint(ijk.min(0)).astype(np.int64), np.rint(ijk.max(0)).astype(np.int64)
    if shape is not None:
        upper = np.asarray(shape, dtype=np.int64) - 1
        if clip and not ((hi < 0) | (lo > upper)).any():
            lo, hi = np.clip(lo, 0, upper), np.clip(hi, 0, upper)
        check_inside(np.stack([lo, hi]), shape, what)
    return np.concatenate([lo, hi])


def lps_to_ras(xyz: object) -> np.ndarray:
    """World points from DICOM's LPS+ patient frame to RAS+ (mm): x and y change sign."""
    points = _points(xyz, 3, "xyz").copy()
    points[..., :2] *= -1
    return points


def ras_to_lps(xyz: object) -> np.ndarray:
    """World points from RAS+ to DICOM's LPS+ (mm); the same flip as :func:`lps_to_ras`."""
    return lps_to_ras(xyz)


def lps_to_ras_affine(affine: object) -> np.ndarray:
    """A voxel-to-LPS affine (as built from DICOM's ImagePositionPatient/Orientation) as a voxel-to-RAS affine."""
    return _FLIP_XY @ _affine(affine)


def voxel_to_model_input(ijk: object, native_affine: object, model_affine: object) -> np.ndarray:
    """Native voxel indices -> continuous indices of the preprocessed (model-input) grid, through the world.

    ``model_affine`` is the ``affine`` of the preprocessed MetaTensor (MONAI updates it in Orientation, Spacing and
    crops), so no transform's parameters are needed.
    """
    return world_to_voxel(voxel_to_world(ijk, native_affine), model_affine)


def model_input_to_voxel(uvw: object, model_affine: object, native_affine: object) -> np.ndarray:
    """Preprocessed-grid indices -> continuous native voxel indices (inverse of :func:`voxel_to_model_input`)."""
    return world_to_voxel(voxel_to_world(uvw, model_affine), native_affine)
