"""File voxels <-> the RAS-oriented grid: the volume's axes permuted and flipped, never interpolated.

Training reorients every case to RAS (MONAI ``Orientationd("RAS")``), so a 2-D model's slices along its
``slice_axis`` are planes of the RAS grid, and a 3-D model's windows are RAS-ordered. Evaluation and prediction on a
file as stored bring it onto the same grid with the permutation and flips of nibabel's closest canonical orientation
(:func:`nibabel.orientations.io_orientation`): every voxel keeps its value, so nothing is resampled, and the
prediction goes back to the file's array order voxel for voxel. :class:`Orientation` is that step for data (images,
label maps), for indices and for :class:`~medseg.prompts.contract.Prompts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from medseg.prompts.contract import PromptError, Prompts

__all__ = ["Orientation"]


@dataclass(frozen=True, eq=False)
class Orientation:
    """How a file's array axes map onto the RAS-oriented grid (see the module docstring).

    Attributes:
        to_oriented: nibabel orientation transform ``(3, 2)``, file array order -> RAS grid: per file axis, the RAS
            axis it becomes and whether it is flipped (-1).
        to_native: the inverse transform, RAS grid -> file array order.
        native_shape: ``(X, Y, Z)`` of the file.
    """

    to_oriented: np.ndarray
    to_native: np.ndarray
    native_shape: tuple[int, int, int]

    @classmethod
    def from_affine(cls, affine: object, shape: Sequence[int]) -> Orientation:
        """The orientation of a volume of ``shape`` (its last three sizes) whose voxel-to-RAS+ affine is ``affine``."""
        if isinstance(affine, torch.Tensor):
            affine = affine.detach().cpu().numpy()
        ornt = io_orientation(np.asarray(affine, dtype=np.float64))
        ras = axcodes2ornt("RAS")
        native = tuple(int(s) for s in shape[-3:])
        return cls(ornt_transform(ornt, ras), ornt_transform(ras, ornt), native)  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` of the RAS grid."""
        return self.along_ras(self.native_shape)  # type: ignore[return-value]

    def file_axis(self, axis: int) -> int:
        """The file's array axis that becomes RAS-grid axis ``axis``."""
        return int(np.flatnonzero(self.to_oriented[:, 0] == axis)[0])

    def along_ras(self, values: Sequence) -> tuple:
        """Per-file-axis values (voxel sizes in mm, sizes) reordered to the RAS grid's axes."""
        out = [values[0]] * 3
        for axis, (new_axis, _) in enumerate(self.to_oriented):
            out[int(new_axis)] = values[axis]
        return tuple(out)

    # --- data ---------------------------------------------------------------------------------------------------

    def orient(self, array: np.ndarray) -> np.ndarray:
        """A file-order ``(X, Y, Z)`` array, or ``(C, X, Y, Z)`` channel by channel, on the RAS grid."""
        array = np.asarray(array)
        if array.ndim == 4:
            return np.ascontiguousarray(np.stack([apply_orientation(channel, self.to_oriented) for channel in array]))
        return np.ascontiguousarray(apply_orientation(array, self.to_oriented))

    def native(self, array: np.ndarray) -> np.ndarray:
        """An ``(X, Y, Z)`` array on the RAS grid in the file's array order."""
        return np.ascontiguousarray(apply_orientation(array, self.to_native))

    # --- indices and prompts ------------------------------------------------------------------------------------

    def indices(self, ijk: np.ndarray) -> np.ndarray:
        """``(..., 3)`` voxel indices of the file -> indices of the RAS grid (the same permutation and flips as the
        data, so a voxel's value is found at its mapped index); the dtype is kept."""
        ijk = np.asarray(ijk)
        out = np.empty_like(ijk)
        for axis, (new_axis, flip) in enumerate(self.to_oriented):
            values = ijk[..., axis]
            out[..., int(new_axis)] = self.native_shape[axis] - 1 - values if flip < 0 else values
        return out

    def native_indices(self, ijk: np.ndarray) -> np.ndarray:
        """``(..., 3)`` indices of the RAS grid -> voxel indices of the file (inverse of :meth:`indices`)."""
        ijk = np.asarray(ijk)
        out = np.empty_like(ijk)
        for axis, (new_axis, flip) in enumerate(self.to_oriented):
            values = ijk[..., int(new_axis)]
            out[..., axis] = self.native_shape[axis] - 1 - values if flip < 0 else values
        return out

    def prompts(self, prompts: Prompts) -> Prompts:
        """3-D prompts in voxels of the file -> the same prompts on the RAS grid.

        A box's corners are mapped and re-sorted per axis (a flipped axis swaps low and high), so a box flat along
        one file axis stays flat along the corresponding RAS axis. Padding points stay padding.

        Raises:
            PromptError: 2-D prompts, or a ``prev_mask`` (it belongs to a model grid, not to the file).
        """
        if prompts.spatial_dims not in (None, 3) or prompts.prev_mask is not None:
            raise PromptError("Orientation.prompts maps 3-D points and boxes of a file; give them without a prev_mask.")
        fields = {}
        if prompts.point_coords is not None:
            fields["point_coords"] = torch.from_numpy(self.indices(prompts.point_coords.cpu().numpy()))
        if prompts.box is not None:
            box = prompts.box.cpu().numpy()
            lo, hi = self.indices(box[:, :3]), self.indices(box[:, 3:])
            fields["box"] = torch.from_numpy(np.concatenate([np.minimum(lo, hi), np.maximum(lo, hi)], axis=1))
        return replace(prompts, **fields)
