"""The prepared volume: what the promptable path hands a trained model, built from an image as read.

A promptable run is prompted (by ``medseg predict``) and scored (by its interactive evaluation) on each volume as
stored, never on the resampled training grid, so that every mask lands on the file's own voxels:

1. the run's deterministic *intensity* transforms are applied (:func:`intensity_transforms`: CT window, MR
   percentiles; the transforms :class:`monai.transforms.Invertd` would invert, resampling and cropping, are left out);
2. the volume is reoriented to RAS by axis permutation and flips only
   (:class:`~medseg.prompts.geometry.Orientation`, no interpolation), so that a 2-D model's slices along its
   ``slice_axis`` are the planes it was trained on and a 3-D model's axes are the ones it was trained on;
3. a 3-D model further sees the volume zoomed to its training spacing: :func:`model_grid` sizes that grid.

:class:`PreparedVolume` carries the result and the way back (:meth:`PreparedVolume.native`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform

from medseg.data.io import LoadCased
from medseg.prompts.geometry import Orientation, voxel_spacing

__all__ = ["PreparedVolume", "intensity_transforms", "model_grid", "prepare_volume"]


@dataclass
class PreparedVolume:
    """One image after the run's intensity transforms, on the RAS-oriented grid (module docstring).

    Attributes:
        image: ``(C, X, Y, Z)`` float32 intensities on the RAS grid.
        orientation: file array order <-> RAS grid, for data, indices and prompts.
        spacing: voxel size (mm) along the RAS grid's axes.
    """

    image: np.ndarray
    orientation: Orientation
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` of the RAS grid."""
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    def native(self, array: np.ndarray) -> np.ndarray:
        """``array`` on the RAS grid, in the file's array order."""
        return self.orientation.native(array)


def intensity_transforms(transform: Any) -> list[Callable]:
    """The deterministic transforms that change intensities only (not inverted by ``Invertd``, not the loader)."""
    return [t for t in getattr(transform, "transforms", ()) if not isinstance(t, InvertibleTransform | LoadCased)]


def prepare_volume(image: MetaTensor, intensity: Sequence[Callable] = ()) -> PreparedVolume:
    """Apply ``intensity`` to ``image`` and reorient it to RAS by permutation and flips (steps 1-2 of the module).

    Args:
        image: ``(C, X, Y, Z)`` MetaTensor as read (:func:`medseg.inference.cases.read_case`), affine in RAS+ mm.
        intensity: dictionary transforms on ``{"image": ...}`` (:func:`intensity_transforms` of the run's).
    """
    data: dict[str, Any] = {"image": image}
    for transform in intensity:
        data = transform(data)
    affine = np.asarray(image.affine, dtype=np.float64)
    orientation = Orientation.from_affine(affine, image.shape[1:])
    values = np.asarray(torch.as_tensor(data["image"]).float().numpy())
    return PreparedVolume(orientation.orient(values), orientation, orientation.along_ras(voxel_spacing(affine)))


def model_grid(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None) -> tuple[int, ...]:
    """Voxels per axis of a volume of ``shape`` at ``spacing`` (mm) resampled to ``target`` mm (None: unchanged)."""
    if target is None:
        return tuple(int(s) for s in shape)
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target))
