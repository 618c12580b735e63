"""A file's slices along one array axis <-> the same slices of the RAS-oriented grid, for interactive sessions.

The napari sessions (:class:`~medseg.inference.session.SegmentationSession` for LiteMedSAM and other SAM-style models,
:class:`~medseg.inference.sam2_session.Sam2Session` for SAM 2's memory) let the user scroll, box and click in the
file's array order, the order napari shows, while the model sees the slices of the RAS-oriented grid
(:class:`~medseg.prompts.geometry.orientation.Orientation`: permutation and flips, never interpolation), as training
and ``medseg predict`` do: neither model is invariant to a flipped or transposed slice, so slicing the file as stored
would give a DICOM series and the NIfTI of one scan different masks. :class:`SliceOrientation` is the one place that
maps a slice index, a slice's box and points, a slice's mask and a slice range between the two orders.

Slicing a file axis of the RAS grid keeps the slice a plane of the grid: the file's slice axis becomes one RAS axis
(possibly reversed, so slice ``k`` of the file is slice ``depth - 1 - k`` of the grid), and the slice's two in-plane
axes become the grid's other two (possibly swapped and reversed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg.errors import ConfigError
from medseg.prompts.geometry.orientation import Orientation

__all__ = ["SliceOrientation"]


@dataclass(frozen=True, eq=False)
class SliceOrientation:
    """The file's slices along ``axis`` <-> the RAS grid's slices (module docstring).

    Attributes:
        orientation: file array order <-> RAS grid (identity when the file is stored in RAS order).
        axis: the file's array axis the user slices along.
    """

    orientation: Orientation
    axis: int

    @classmethod
    def from_affine(cls, affine: object | None, shape: Sequence[int], axis: int) -> SliceOrientation:
        """Slices along file axis ``axis`` of a volume of ``shape`` whose voxel-to-RAS+ affine is ``affine``;
        ``None`` takes the array as given (the grid is the file's own order).

        Raises:
            ConfigError: an axis outside 0-2.
        """
        if axis not in (0, 1, 2):
            raise ConfigError(f"slice axis must be 0, 1 or 2, got {axis}.")
        return cls(Orientation.from_affine(np.eye(4) if affine is None else affine, shape), int(axis))

    @property
    def grid_axis(self) -> int:
        """The RAS grid's axis the file's slice axis becomes (the axis the model's slices are taken along)."""
        return int(self.orientation.to_oriented[self.axis, 0])

    @property
    def reversed(self) -> bool:
        """Whether the grid runs through the slices in the file's reverse order."""
        return bool(self.orientation.to_oriented[self.axis, 1] < 0)

    @property
    def depth(self) -> int:
        """Number of slices along :attr:`axis`."""
        return int(self.orientation.native_shape[self.axis])

    # --- volumes ------------------------------------------------------------------------------------------------

    def slices(self, volume: np.ndarray) -> np.ndarray:
        """A file-order ``(X, Y, Z)`` array -> the RAS grid's slices, slice axis first (grid slice order)."""
        return np.moveaxis(self.orientation.orient(volume), self.grid_axis, 0)

    def native(self, array: np.ndarray) -> np.ndarray:
        """An ``(X, Y, Z)`` array on the RAS grid (a propagated mask) -> the file's array order."""
        return self.orientation.native(array)

    # --- indices ------------------------------------------------------------------------------------------------

    def grid_index(self, index: int) -> int:
        """The file's slice ``index`` -> the index of the same slice on the grid.

        Raises:
            ConfigError: a slice outside the volume.
        """
        if not 0 <= index < self.depth:
            raise ConfigError(f"slice {index} is outside 0..{self.depth - 1} along axis {self.axis}.")
        return self.depth - 1 - int(index) if self.reversed else int(index)

    def file_index(self, grid_index: int) -> int:
        """The grid's slice ``grid_index`` -> the file's index of that slice (inverse of :meth:`grid_index`)."""
        return self.grid_index(grid_index)  # a reversal is its own inverse

    def file_range(self, first: int, last: int) -> tuple[int, int]:
        """Slices ``first..last`` of the grid -> the same slices as the file's ``(first, last)``; an empty range
        (``last == first - 1``) stays empty, next to the same slice."""
        if not self.reversed:
            return int(first), int(last)
        return self.depth - 1 - int(last), self.depth - 1 - int(first)

    # --- one slice ----------------------------------------------------------------------------------------------

    def prompts(
        self, index: int, box: Sequence[float] | None, points: Sequence[Sequence[float]] | None
    ) -> tuple[list[float] | None, list[list[float]] | None]:
        """A box ``(i0, j0, i1, j1)`` and points ``(i, j)`` on the file's slice ``index`` -> the same on the grid's
        slice (corners re-sorted: a flipped axis swaps low and high). Coordinates stay fractional (a click between
        voxel centres maps exactly: ``n - 1 - x`` on a flipped axis); ``None`` and no points pass through."""
        self.grid_index(index)  # a slice outside the volume is refused here too
        plane = [a for a in range(3) if a != self.axis]

        def grid(pairs: Sequence) -> np.ndarray:
            pairs = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
            ijk = np.full((len(pairs), 3), float(index))
            ijk[:, plane] = pairs
            return np.delete(self.orientation.indices(ijk), self.grid_axis, axis=1)

        if box is not None:
            corners = grid(box)
            box = [*corners.min(axis=0).tolist(), *corners.max(axis=0).tolist()]
        if points:
            points = grid(points).tolist()
        return box, points  # type: ignore[return-value]

    def file_plane(self, plane: np.ndarray) -> np.ndarray:
        """A ``(.., ..)`` array of a grid slice (a mask) -> the file's slice (axes back in the file's order,
        unflipped)."""
        p, q = (a for a in range(3) if a != self.axis)
        (grid_p, flip_p), (grid_q, flip_q) = self.orientation.to_oriented[[p, q]]
        if grid_p > grid_q:
            plane = plane.T
        return np.ascontiguousarray(plane[:: int(flip_p), :: int(flip_q)])
