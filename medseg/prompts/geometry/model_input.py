"""Where prompts land in what a model sees of the (RAS-oriented) grid: one slice, a resized slice, a zoomed volume.

- **slice**: a 2-D model sees the grid one slice at a time along an axis. :func:`prompts_on_slice` gives the 2-D
  prompts of one slice (the section of a box through it, the points lying on it); :func:`slice_box` reads a box flat
  along the axis.
- **2-D model input**: each slice resized so its longest side is ``size``, zero-padded at the end
  (:class:`SliceGeometry`). Two conventions map slice pixels there. Resizing as ``interpolate(align_corners=False)``
  (MONAI ``Resize``'s default) moves pixel centres by ``u = (i + 0.5) * resized / original - 0.5``
  (:func:`to_model_input_2d`, exact for the slices of :func:`medseg.inference.sliding.to_model_input`). The official
  LiteMedSAM recipe (``CVPR24_LiteMedSAM_infer.py``, what every promptable path of medseg reproduces) multiplies
  coordinates by ``size / max(H, W)`` and truncates the box to integers (:func:`to_recipe_input`).
- **3-D model grid**: a volumetric model sees the whole grid zoomed to its training spacing (trilinear,
  ``align_corners=False``); :func:`zoom_prompts` moves points to the voxel centres they fall on there and boxes to the
  voxels that cover them.

Coordinates are in array order (the :mod:`medseg.prompts.contract` convention), never SAM's ``(x, y)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from medseg.errors import ConfigError
from medseg.prompts.contract import PromptError, Prompts
from medseg.prompts.geometry.world import _points, check_inside

__all__ = [
    "SliceGeometry",
    "box_to_model_input_2d",
    "from_model_input_2d",
    "prompts_on_slice",
    "slice_box",
    "to_model_input_2d",
    "to_recipe_input",
    "zoom_prompts",
]


@dataclass(frozen=True)
class SliceGeometry:
    """How slices were brought to the model's input size, so that the model's output can be brought back.

    Attributes:
        original: ``(H, W)`` of the slices before resizing (pixels of the preprocessed volume).
        resized: ``(h, w)`` after resizing the longest side to ``size`` (before padding).
        size: the model's square input size (pixels).
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    size: int


# --- one slice of the grid ----------------------------------------------------------------------------------------


def slice_box(box: Sequence[float], axis: int) -> tuple[int, tuple[float, float, float, float]]:
    """The slice index and 2-D box of a 3-D box flat along ``axis`` (prompts-file / VISTA3D ``(i0, j0, k0, i1, j1,
    k1)``, e.g. :func:`medseg.evaluation.interactive.middle_slice_box`).

    Raises:
        ConfigError: not 6 numbers, or not flat along ``axis`` (``lo != hi`` there).
    """
    values = [float(v) for v in box]
    if len(values) != 6 or values[axis] != values[axis + 3]:
        raise ConfigError(f"a propagation box must be 6 numbers, flat along axis {axis} (lo == hi there), got {box}.")
    lo = [v for a, v in enumerate(values[:3]) if a != axis]
    hi = [v for a, v in enumerate(values[3:]) if a != axis]
    return int(values[axis]), (lo[0], lo[1], hi[0], hi[1])


def prompts_on_slice(prompts: Prompts, axis: int, index: int) -> Prompts | None:
    """The 2-D prompts of slice ``index`` along ``axis`` of one 3-D prompt set (batch of one, voxels of the grid).

    The box becomes its section through the slice (its extent on the two other axes; the slice must lie within the
    box), the points those whose coordinate along ``axis`` is ``index`` (padding dropped), with their labels. The
    class vector and a previous mask do not carry over (the first names the object, the second belongs to a grid).

    Returns:
        :class:`Prompts` ``box (1, 4)``, ``point_coords (1, P, 2)``, in the slice's array order, or ``None`` when
        nothing of the prompt set lies on the slice.

    Raises:
        PromptError: more than one prompt set, 2-D prompts, or a box that does not reach the slice.
    """
    if prompts.batch_size != 1 or prompts.spatial_dims != 3:
        raise PromptError(
            f"prompts_on_slice takes one 3-D prompt set; got {prompts.batch_size} of {prompts.spatial_dims}-D."
        )
    plane = [a for a in range(3) if a != axis]
    fields: dict[str, torch.Tensor] = {}
    if prompts.box is not None:
        box = prompts.box[0]
        if not float(box[axis]) <= index <= float(box[axis + 3]):
            raise PromptError(f"box {box.tolist()} does not reach slice {index} along axis {axis}.")
        fields["box"] = box[[plane[0], plane[1], plane[0] + 3, plane[1] + 3]][None]
    if prompts.point_coords is not None:
        coords, labels = prompts.point_coords[0], prompts.point_labels[0]
        on = (coords[:, axis] == index) & (labels >= 0)
        if bool(on.any()):
            fields["point_coords"] = coords[on][:, plane][None]
            fields["point_labels"] = labels[on][None]
    return Prompts(**fields) if fields else None


# --- the 2-D model's input ----------------------------------------------------------------------------------------


def _scale(geometry: SliceGeometry) -> np.ndarray:
    return np.asarray(geometry.resized, dtype=np.float64) / np.asarray(geometry.original, dtype=np.float64)


def to_model_input_2d(ij: object, geometry: SliceGeometry) -> np.ndarray:
    """Slice pixel indices ``(..., 2)`` (row, column) -> continuous pixel indices of the 2D model's input.

    Args:
        ij: points on the slice before :func:`medseg.inference.sliding.to_model_input`, in array order.
        geometry: the :class:`SliceGeometry` that call returned.

    Returns:
        ``(..., 2)`` float (row, column) in the ``size x size`` model input; SAM's ``(x, y)`` is ``[..., ::-1]``.
    """
    points = _points(ij, 2, "ij")
    check_inside(points, geometry.original, "point on the slice")
    return (points + 0.5) * _scale(geometry) - 0.5


def from_model_input_2d(uv: object, geometry: SliceGeometry) -> np.ndarray:
    """Model-input pixel indices ``(..., 2)`` -> continuous slice pixel indices (inverse of :func:`to_model_input_2d`).

    Raises:
        PromptError: a point lies in the zero padding, which no slice pixel maps to.
    """
    points = _points(uv, 2, "uv")
    check_inside(points, geometry.resized, "model-input point (outside the resized slice, in the padding)")
    return (points + 0.5) / _scale(geometry) - 0.5


def box_to_model_input_2d(box: object, geometry: SliceGeometry) -> np.ndarray:
    """An inclusive slice box ``(i0, j0, i1, j1)`` -> the box of the same pixel centres in model-input pixels."""
    array = _points(box, 4, "box")
    return np.concatenate(
        [to_model_input_2d(array[..., :2], geometry), to_model_input_2d(array[..., 2:], geometry)], -1
    )


def to_recipe_input(prompts: Prompts, geometry: SliceGeometry, prev_mask: torch.Tensor | None = None) -> Prompts:
    """One 2-D prompt set in slice pixels -> the LiteMedSAM recipe's model input (step 4 of
    :mod:`medseg.inference.recipe`): coordinates times ``size / max(H, W)``, the box truncated to integers
    (``int(v * 256 / max(H, W))``, the official rounding), padding points dropped.

    Args:
        prompts: box ``(1, 4)`` and/or points ``(1, N, 2)`` on the slice, array order.
        geometry: the slice's :class:`SliceGeometry`.
        prev_mask: the model's own previous logits ``(1, 1, S, S)``, already on its input grid (SAM's mask input).
    """
    if prompts.batch_size != 1 or prompts.spatial_dims != 2:
        raise PromptError(
            f"to_recipe_input takes one 2-D prompt set; got {prompts.batch_size} of {prompts.spatial_dims}-D."
        )
    scale = geometry.size / max(geometry.original)
    fields: dict[str, torch.Tensor | None] = {"prev_mask": prev_mask}
    if prompts.box is not None:  # in float64, then truncated, as the official script computes it
        fields["box"] = torch.tensor([[int(v * scale) for v in prompts.box[0].tolist()]], dtype=torch.float32)
    if prompts.point_coords is not None:
        real = prompts.point_labels[0] >= 0
        fields["point_coords"] = prompts.point_coords[:, real].float() * scale
        fields["point_labels"] = prompts.point_labels[:, real]
    return Prompts(**fields)


# --- the 3-D model's grid -----------------------------------------------------------------------------------------


def zoom_prompts(prompts: Prompts, shape: Sequence[int], model_shape: Sequence[int]) -> Prompts:
    """3-D prompts in voxels of a grid of ``shape`` -> the same grid zoomed to ``model_shape`` (trilinear resampling
    with ``align_corners=False``, what a volumetric model sees at its training spacing).

    A point goes to the position of its voxel centre on the finer or coarser grid, clipped inside it; a box to the
    inclusive voxels that cover its voxels (at least one voxel per axis). ``prev_mask`` is left as it is: it belongs
    to the model grid already (the model's own previous logits).
    """
    native = torch.tensor([int(s) for s in shape], dtype=torch.float32)
    size = torch.tensor([int(s) for s in model_shape], dtype=torch.float32)
    factor = size / native
    if prompts.point_coords is not None:
        coords = ((prompts.point_coords.float() + 0.5) * factor - 0.5).clamp_min(0)
        prompts = replace(prompts, point_coords=torch.minimum(coords, size - 1))
    if prompts.box is not None:
        box = prompts.box.float()
        lo = torch.floor(box[:, :3] * factor)
        hi = torch.minimum(torch.ceil((box[:, 3:] + 1) * factor) - 1, size - 1)
        prompts = replace(prompts, box=torch.cat([lo, torch.maximum(hi, lo)], dim=1))
    return prompts
