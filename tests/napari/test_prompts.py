"""napari prompt layer data -> 2-D prompts of one slice."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.napari.prompts import box_on_slice, boxes_on_slice, point_labels, points_on_slice
from medseg.prompts.contract import PromptError


def rectangle(axis: int, index: float, lo: tuple[float, float], hi: tuple[float, float]) -> np.ndarray:
    """The 4 vertices napari stores for a rectangle drawn on slice ``index`` along ``axis``."""
    corners = [(lo[0], lo[1]), (lo[0], hi[1]), (hi[0], hi[1]), (hi[0], lo[1])]
    return np.array([np.insert(np.array(c, float), axis, index) for c in corners])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_rectangle_becomes_an_inclusive_box_on_its_slice(axis):
    index, box = box_on_slice(rectangle(axis, 4.0, (10.4, 3.6), (20.2, 17.5)), axis)
    assert (index, box) == (4, (10, 4, 20, 18))


def test_boxes_are_clipped_and_filtered_by_slice():
    shapes = [rectangle(2, 1, (-3, 2), (70, 9)), rectangle(2, 2, (1, 1), (5, 5)), rectangle(0, 1, (0, 0), (3, 3))]
    assert boxes_on_slice(shapes, 2, 1, shape=(64, 64, 3)) == [(0, 2, 63, 9)]
    assert box_on_slice(rectangle(0, 1, (0, 0), (3, 3)), 2) is None  # drawn in another view


def test_points_on_the_slice_keep_their_labels():
    points = np.array([[5.0, 6.0, 2.0], [7.0, 8.0, 3.0], [9.2, 1.4, 2.4]])
    labels = point_labels(["positive", "negative", "negative"], 3)
    assert points_on_slice(points, labels, 2, 2) == ([(5.0, 6.0), (9.2, 1.4)], [1, 0])
    assert points_on_slice(points, labels, 0, 7) == ([(8.0, 3.0)], [0])
    assert point_labels(None, 2) == [1, 1]


def test_bad_prompts_are_prompt_errors():
    with pytest.raises(PromptError, match="positive"):
        point_labels(["maybe"], 1)
    with pytest.raises(PromptError, match="one label per point"):
        points_on_slice(np.zeros((2, 3)), [1], 2, 0)
    with pytest.raises(PromptError, match="rectangle"):
        box_on_slice(np.zeros((4, 2)), 2)
