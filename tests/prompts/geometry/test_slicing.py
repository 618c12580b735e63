"""``SliceOrientation``: a file's slices, their prompts, masks and ranges <-> the RAS-oriented grid's slices.

Checked against the data itself: whatever a mapping says, the voxel it names on the grid must hold the value the file
holds there, on permuted and flipped grids (the oblique phantom affine of ``tests/prompts/test_geometry.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

from medseg.data.prepare.synthetic import phantom_affine
from medseg.errors import ConfigError
from medseg.prompts.geometry.slicing import SliceOrientation

SHAPE = (12, 14, 9)
AXCODES = ["RAS", "LPS", "LIA", "PSR", "ILP"]


def _affine(axcodes: str) -> np.ndarray:
    return phantom_affine(SHAPE, (0.7, 0.9, 3.0), orientation=axcodes, oblique_degrees=17.0, oblique_axis=(1, 2, 0.5))


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    """Distinct values everywhere, so a value names its voxel."""
    return np.random.default_rng(0).permutation(np.prod(SHAPE)).reshape(SHAPE).astype(np.float32)


@pytest.mark.parametrize("axcodes", AXCODES)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_file_slice_is_a_grid_slice_and_its_mask_comes_back_in_the_files_order(data, axcodes, axis):
    slicing = SliceOrientation.from_affine(_affine(axcodes), SHAPE, axis)
    slices = slicing.slices(data)
    assert slicing.depth == SHAPE[axis] == slices.shape[0]
    oriented = slicing.orientation.orient(data)
    assert np.array_equal(np.moveaxis(oriented, slicing.grid_axis, 0), slices)
    for k in range(slicing.depth):
        grid = slicing.grid_index(k)
        assert slicing.file_index(grid) == k
        # the grid slice holds exactly the file slice's voxels, and file_plane puts them back where they were
        assert np.array_equal(slicing.file_plane(slices[grid]), np.take(data, k, axis=axis))
    assert np.array_equal(slicing.native(oriented), data)


@pytest.mark.parametrize("axcodes", AXCODES)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_prompts_on_a_file_slice_land_on_the_same_voxels_of_the_grid_slice(data, axcodes, axis):
    slicing = SliceOrientation.from_affine(_affine(axcodes), SHAPE, axis)
    k = 3
    plane_file, plane_grid = np.take(data, k, axis=axis), slicing.slices(data)[slicing.grid_index(k)]
    # a box: the block it covers on the file's slice is the block the mapped box covers on the grid's slice
    box = (1, 2, 5, 7)
    block = np.zeros(plane_file.shape, dtype=bool)
    block[1:6, 2:8] = True
    grid_box, no_points = slicing.prompts(k, box, None)
    where = np.argwhere(np.isin(plane_grid, plane_file[block]))
    assert no_points is None and grid_box == [*where.min(0).tolist(), *where.max(0).tolist()]
    # points: the voxel named holds the same value; a point between voxel centres stays between the same ones
    points = [(0, 0), (4, 6), (plane_file.shape[0] - 1, 1)]
    no_box, grid_points = slicing.prompts(k, None, points)
    assert no_box is None
    for (i, j), (gi, gj) in zip(points, grid_points):
        assert plane_grid[int(gi), int(gj)] == plane_file[i, j]
    (mid,) = slicing.prompts(k, None, [(4.5, 6.0)])[1]
    a, b = slicing.prompts(k, None, [(4, 6), (5, 6)])[1]
    assert np.allclose(mid, (np.asarray(a) + np.asarray(b)) / 2)


@pytest.mark.parametrize("axcodes", AXCODES)
def test_a_grid_slice_range_is_the_same_slices_in_file_indices(axcodes):
    for axis in range(3):
        slicing = SliceOrientation.from_affine(_affine(axcodes), SHAPE, axis)
        first, last = slicing.file_range(2, 5)
        assert set(range(first, last + 1)) == {slicing.file_index(g) for g in range(2, 6)}
        first, last = slicing.file_range(4, 3)  # nothing kept next to slice 4
        assert last == first - 1 and slicing.file_index(4) in (first, last)


def test_without_an_affine_the_grid_is_the_array_as_given(data):
    for axis in range(3):
        slicing = SliceOrientation.from_affine(None, SHAPE, axis)
        assert slicing.grid_axis == axis and not slicing.reversed
        assert np.array_equal(slicing.slices(data), np.moveaxis(data, axis, 0))
        assert slicing.prompts(2, (1.5, 2, 3, 4), [(0.25, 3)]) == ([1.5, 2.0, 3.0, 4.0], [[0.25, 3.0]])
        assert slicing.file_range(1, 4) == (1, 4)


def test_a_reversed_slice_axis_counts_slices_from_the_other_end():
    flipped_z = np.diag([1.0, 1.0, -1.0, 1.0])  # file axis 2 runs inferior: the grid reverses it
    slicing = SliceOrientation.from_affine(flipped_z, SHAPE, 2)
    assert slicing.reversed and slicing.grid_axis == 2
    assert [slicing.grid_index(k) for k in (0, 1, 8)] == [8, 7, 0]
    assert slicing.file_range(0, 2) == (6, 8)


def test_bad_axes_and_slices_name_the_fix():
    with pytest.raises(ConfigError, match="slice axis must be 0, 1 or 2, got 3"):
        SliceOrientation.from_affine(None, SHAPE, 3)
    slicing = SliceOrientation.from_affine(None, SHAPE, 1)
    with pytest.raises(ConfigError, match="slice 14 is outside 0..13 along axis 1"):
        slicing.grid_index(14)
    with pytest.raises(ConfigError, match="outside 0..13"):
        slicing.prompts(-1, (0, 0, 1, 1), None)
