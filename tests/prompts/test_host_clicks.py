"""Correction clicks for a batch on the host: the clicks of the scipy reference (ClickSimulator.next_click)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.prompts import ClickSimulator, PromptError, interactive_loop
from medseg.prompts.host_clicks import correction_clicks

SPACING_3D = (0.7, 0.7, 3.0)


def blocky(rng: np.random.Generator, shape: tuple[int, ...], cell: int = 3, flips: float = 0.05) -> np.ndarray:
    """A random mask of blocks (many exact distance ties) with single voxels flipped (many small components)."""
    mask = rng.random(tuple(-(-n // cell) for n in shape)) < rng.uniform(0.3, 0.7)
    for axis in range(len(shape)):
        mask = mask.repeat(cell, axis=axis)
    return mask[tuple(slice(0, n) for n in shape)] ^ (rng.random(shape) < flips)


def reference_clicks(simulator: ClickSimulator, gt, pred, previous=None) -> list:
    previous = previous or [[] for _ in gt]
    return [simulator.next_click(g, p, [(c, 1) for c in given]) for g, p, given in zip(gt, pred, previous)]


def test_several_regions_and_objects_in_2d_give_the_reference_clicks():
    gt = np.zeros((6, 40, 40), dtype=bool)
    gt[:5, 5:35, 5:35] = True
    pred = gt.copy()
    pred[0, 5:20, 5:35] = False  # a large missed band
    pred[0, 37:39, 37:39] = True  # a small false positive
    pred[0, 30:34, 30:34] = False  # a medium missed square
    pred[1, 0:5, :] = True  # a large false positive band along the border
    pred[1, 20, 20] = False  # one missed voxel
    pred[3, 10:13, 10:13] = False  # missed 3 x 3 ...
    pred[3, 36:39, 36:39] = True  # ... and a false positive of the same size: the missed one goes first
    pred[4, 25:28, 25:27] = False  # two missed regions of 6 voxels: the first in C order goes first
    pred[4, 8:10, 20:23] = False
    pred[5, 1:4, 30:38] = True  # no object: one false positive region
    clicks = correction_clicks(gt, pred)
    assert clicks == reference_clicks(ClickSimulator(), gt, pred)
    assert clicks[0] == ((12, 12), 1) and clicks[1][1] == 0 and clicks[1][0][0] < 5
    assert clicks[2] is None  # predicted perfectly: nothing to correct
    assert clicks[3] == ((11, 11), 1) and clicks[4][0][0] in (8, 9) and clicks[5] == ((2, 31), 0)


def test_3d_anisotropic_spacing_and_objects_cut_by_the_border_give_the_reference_clicks():
    rng = np.random.default_rng(3)
    gt = np.zeros((5, 16, 14, 8), dtype=bool)
    gt[:, 3:13, 2:12, 1:7] = True
    pred = gt.copy()
    pred[0, 3:6] = False  # thin missed slab across i: 3 voxels of 0.7 mm
    pred[0, 0:2, :, :] = True  # a false positive slab outside, larger than the miss
    pred[1, :, :, 6:8] = True  # a false positive across k (3 mm voxels) that touches the border
    pred[2] = blocky(rng, (16, 14, 8))
    gt[3], pred[3] = False, False  # no object: the whole prediction is one false positive
    pred[3, 2:9, 2:9, 2:5] = True  # 4.9 x 4.9 x 9 mm: 2.8 mm from the i and j faces at every k, 3 mm from k's
    gt[4, :, :, :] = True  # the whole field of view: the border is the boundary
    pred[4] = False
    simulator = ClickSimulator(spacing=SPACING_3D)
    clicks = correction_clicks(gt, pred, spacing=SPACING_3D)
    assert clicks == reference_clicks(simulator, gt, pred)
    assert clicks[0][1] == 0 and clicks[3] == ((5, 5, 2), 0)  # the tie at k = 2, 3, 4 goes to the first
    assert clicks[4][1] == 1 and clicks[4][0] != (0, 0, 0)


def test_empty_error_regions_and_exhausted_regions():
    gt = np.zeros((3, 8, 8), dtype=bool)
    gt[:, 2, 2] = True
    pred = np.zeros_like(gt)
    pred[:, 6, 6] = True  # two one-voxel regions: the missed one first
    pred[2] = gt[2]  # perfect: no error region at all
    previous = [[(2, 2)], [(2, 2), (6, 6)], []]  # item 0: the miss was clicked; item 1: both were
    clicks = correction_clicks(gt, pred, previous)
    assert clicks == [((6, 6), 0), None, None]
    assert clicks == reference_clicks(ClickSimulator(), gt, pred, previous)
    assert correction_clicks(gt, pred, previous, avoid_repeats=False) == [((2, 2), 1), ((2, 2), 1), None]
    assert correction_clicks(gt, gt) == [None, None, None]  # no error anywhere in the batch
    assert correction_clicks(gt, gt, [[(-1, 9)], [(9, 9)], []]) == [None, None, None]  # outside the array: ignored


def test_a_model_that_ignores_clicks_gets_the_reference_sequence_of_new_clicks():
    grid = np.indices((16, 16, 16))
    gt = sum((g - 8) ** 2 for g in grid) <= 25
    seen: list = []
    interactive_loop(lambda prompts, prev: np.zeros(gt.shape), gt, 6, clicks_out=seen)
    given: list = []
    for coord, label in seen:
        assert correction_clicks(gt[None], np.zeros((1, *gt.shape), bool), [given]) == [(coord, label)]
        given.append(coord)


@pytest.mark.parametrize(
    ("shape", "spacing", "connectivity"),
    [
        ((16, 16), (1.0, 1.0), 1),
        ((15, 18), (0.7, 1.3), 2),
        ((40, 33), (1.0, 1.0), 1),
        ((9, 10, 8), SPACING_3D, 1),
        ((9, 10, 8), (1.0, 1.0, 1.0), 3),
        ((12, 9, 11), (1.5, 1.5, 3.0), 2),
    ],
)
def test_random_masks_give_the_reference_clicks(shape, spacing, connectivity):
    rng = np.random.default_rng(4)
    count = 40
    gt = np.stack([blocky(rng, shape) for _ in range(count)])
    pred = np.stack([g ^ blocky(rng, shape, cell=2, flips=0.1) * (rng.random(shape) < 0.5) for g in gt])
    pred[::7] = gt[::7]  # some perfect predictions among them
    previous = [[tuple(int(v) for v in c) for c in rng.integers(0, shape, size=(3, len(shape)))] for _ in gt]
    simulator = ClickSimulator(spacing=spacing, connectivity=connectivity)
    clicks = correction_clicks(gt, pred, previous, spacing, connectivity)
    assert clicks == reference_clicks(simulator, gt, pred, previous)
    assert count // 2 < sum(click is not None for click in clicks) < count


def test_tensors_and_float_masks_are_thresholded_like_the_reference():
    gt = np.zeros((1, 12, 12), dtype=np.float32)
    gt[0, 2:9, 2:9] = 0.9
    gt[0, 5, 5] = 0.5  # not above 0.5: a hole
    pred = np.zeros((1, 12, 12), dtype=np.int64)
    pred[0, 2:9, 2:5] = 3
    expected = [ClickSimulator().next_click(gt[0], pred[0])]
    assert correction_clicks(torch.from_numpy(gt), torch.from_numpy(pred)) == expected == correction_clicks(gt, pred)


def test_bad_inputs_are_refused_naming_the_argument():
    masks = np.zeros((2, 8, 8), dtype=bool)
    with pytest.raises(PromptError, match=r"gt must be a batch of 2D or 3D masks \[B, \*spatial\], got shape \(8, 8\)"):
        correction_clicks(masks[0], masks[0])
    with pytest.raises(PromptError, match="same shape"):
        correction_clicks(masks, masks[:, :4])
    with pytest.raises(PromptError, match="spacing must hold 2 positive voxel sizes"):
        correction_clicks(masks, masks, spacing=(1.0, 0.0))
    with pytest.raises(PromptError, match="connectivity must be 1..2"):
        correction_clicks(masks, masks, connectivity=3)
    with pytest.raises(PromptError, match=r"previous_clicks must hold one list of clicks per item \(2\), got 1"):
        correction_clicks(masks, masks, [[]])


def test_a_memo_reuses_the_distances_of_an_unchanged_region_only():
    grid = np.indices((20, 18))
    gt = (((grid[0] - 9) / 8.0) ** 2 + ((grid[1] - 8) / 6.0) ** 2 <= 1)[None]
    simulator, memo, given = ClickSimulator(spacing=(0.8, 1.0)), {}, [[]]
    nothing = np.zeros_like(gt)
    hole = nothing.copy()
    hole[0, 7:12, 6:11] = True  # the centre predicted: the missed region keeps its box but changes its voxels
    for round_, pred in enumerate([nothing, nothing, hole, hole]):
        before = memo.get(0)
        clicks = correction_clicks(gt, pred, given, (0.8, 1.0), memo=memo)
        assert clicks == reference_clicks(simulator, gt, pred, given)
        if round_ in (1, 3):  # the same region as the round before: its distances are reused
            assert memo[0][2] is before[2]
        elif round_ == 2:
            assert memo[0][2] is not before[2] and memo[0][0] == before[0]  # same box, new distances
        given[0].append(clicks[0][0])
