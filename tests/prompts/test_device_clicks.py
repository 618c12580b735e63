"""Clicks simulated on the device: the same clicks as the scipy reference (ClickSimulator), for a batch at once."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.prompts import ClickSimulator, PromptError, interactive_loop
from medseg.prompts.device_clicks import DeviceClickSimulator, correction_clicks, first_clicks
from medseg.prompts.device_morphology import distance_inside, label_components

SPACING_3D = (0.7, 0.7, 3.0)


def blocky(rng: np.random.Generator, shape: tuple[int, ...], cell: int = 3, flips: float = 0.05) -> np.ndarray:
    """A random mask of blocks (many exact distance ties) with single voxels flipped (many small components)."""
    coarse = rng.random(tuple(-(-n // cell) for n in shape)) < rng.uniform(0.3, 0.7)
    mask = coarse
    for axis in range(len(shape)):
        mask = mask.repeat(cell, axis=axis)
    mask = mask[tuple(slice(0, n) for n in shape)]
    return mask ^ (rng.random(shape) < flips)


def reference_distance(mask: np.ndarray, spacing) -> np.ndarray:
    """The reference's distance (simulate._distance_inside): the EDT of the zero-padded mask."""
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    return ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[inner]


def device_clicks(coords, labels, valid) -> list:
    """Device results as the reference's clicks: ``(coord, label)`` or ``None``."""
    return [(tuple(c), lab) if ok else None for c, lab, ok in zip(coords.tolist(), labels.tolist(), valid.tolist())]


def snake(rows: int, cols: int) -> np.ndarray:
    """A serpentine path over the grid: one component that plain label propagation needs ~rows * cols / 2 steps for."""
    mask = np.zeros((rows, cols), dtype=bool)
    mask[::2] = True
    for row in range(1, rows, 2):
        mask[row, -1 if row % 4 == 1 else 0] = True
    return mask


def test_argmax_returns_the_first_maximum_in_c_order():
    # torch documents it ("the indices of the first maximal value"); the tie rule of the clicks rests on it
    values = torch.zeros(2, 5, 6, dtype=torch.float64)
    values[0, 3, 1] = values[0, 1, 4] = values[0, 4, 0] = 2.0
    values[1, 2, 2] = values[1, 2, 3] = 1.0
    assert values.flatten(1).argmax(dim=1).tolist() == [1 * 6 + 4, 2 * 6 + 2]
    assert values.flatten(1).max(dim=1).indices.tolist() == [1 * 6 + 4, 2 * 6 + 2]


@pytest.mark.parametrize(
    ("shape", "spacing"), [((17, 23), (1.0, 1.0)), ((17, 23), (0.7, 1.3)), ((9, 12, 7), SPACING_3D)]
)
def test_distance_inside_equals_scipy_bit_for_bit(shape, spacing):
    rng = np.random.default_rng(1)
    masks = np.stack([blocky(rng, shape) for _ in range(6)] + [np.ones(shape, bool), np.zeros(shape, bool)])
    expected = np.stack([reference_distance(m, spacing) for m in masks])
    assert np.array_equal(distance_inside(torch.from_numpy(masks), spacing).numpy(), expected)
    chunked = distance_inside(torch.from_numpy(masks), spacing, max_elements=1)  # one line per chunk
    assert np.array_equal(chunked.numpy(), expected)


def scipy_numbering(labels: np.ndarray, shape) -> np.ndarray:
    """Device labels (first voxel's flat index) renumbered 1, 2, ... by first voxel, as scipy numbers them."""
    out = np.zeros(labels.shape, dtype=np.int64)
    for number, first in enumerate(np.unique(labels[labels >= 0]), start=1):
        out[labels == first] = number
    return out.reshape(shape)


@pytest.mark.parametrize(("ndim", "connectivity"), [(2, 1), (2, 2), (3, 1), (3, 2), (3, 3)])
def test_label_components_numbers_components_like_scipy(ndim, connectivity):
    rng = np.random.default_rng(2)
    shape = (31, 29) if ndim == 2 else (11, 9, 10)
    masks = [blocky(rng, shape, cell=2, flips=0.15) for _ in range(6)] + [np.zeros(shape, bool), np.ones(shape, bool)]
    if ndim == 2:
        masks += [snake(31, 29), snake(29, 31).T]
    structure = ndimage.generate_binary_structure(ndim, connectivity)
    labels = label_components(torch.from_numpy(np.stack(masks)), connectivity).numpy()
    assert (label_components(torch.zeros(2, *shape, dtype=torch.bool), connectivity) == -1).all()
    for mask, found in zip(masks, labels):
        expected, count = ndimage.label(mask, structure=structure)
        assert np.array_equal(scipy_numbering(found, shape), expected)
        assert len(np.unique(found[found >= 0])) == count


def test_first_clicks_match_the_reference_on_fixed_cases():
    grid = np.indices((24, 24, 10)).astype(float)
    ellipsoid = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, (10, 12, 4), SPACING_3D)) <= 7.0**2
    border = np.zeros((24, 24, 10), dtype=bool)
    border[:, :9, :] = True  # cut by five faces of the field of view
    cube = np.zeros((24, 24, 10), dtype=bool)
    cube[18:23, 2:7, 5:9] = True
    empty = np.zeros((24, 24, 10), dtype=bool)
    gt = np.stack([ellipsoid, border, cube, empty])
    coords, valid = first_clicks(torch.from_numpy(gt), SPACING_3D)
    reference = ClickSimulator(spacing=SPACING_3D)
    assert valid.tolist() == [True, True, True, False] and coords[3].tolist() == [0, 0, 0]
    for item, coord in zip(gt[:3], coords.tolist()):
        assert reference.first_click(item) == (tuple(coord), 1)
    assert coords[0].tolist() == [10, 12, 4] and coords.dtype == torch.int64
    # two blocks whose interior ranks flip with 4 mm columns (see test_simulate)
    blocks = np.zeros((20, 30), dtype=bool)
    blocks[1:10, 1:10] = True
    blocks[2:17, 20:25] = True
    for spacing in ((1.0, 1.0), (1.0, 4.0)):
        coords, _ = first_clicks(torch.from_numpy(blocks)[None], spacing)
        assert (tuple(coords[0].tolist()), 1) == ClickSimulator(spacing=spacing).first_click(blocks)


def regions_case() -> tuple[np.ndarray, np.ndarray]:
    """Five 2-D objects and predictions: several error regions of different sizes and kinds, and a perfect one."""
    gt = np.zeros((5, 40, 40), dtype=bool)
    gt[:, 5:35, 5:35] = True
    pred = gt.copy()
    pred[0, 5:20, 5:35] = False  # a large missed band
    pred[0, 37:39, 37:39] = True  # a small false positive
    pred[0, 30:34, 30:34] = False  # a medium missed square
    pred[1, 0:5, :] = True  # a large false positive band
    pred[1, 20, 20] = False  # one missed voxel
    pred[3, 10:13, 10:13] = False  # missed 3 x 3 ...
    pred[3, 36:39, 36:39] = True  # ... and a false positive of the same size: the missed one goes first
    pred[4, 25:28, 25:27] = False  # two missed regions of 6 voxels: the first in C order goes first
    pred[4, 8:10, 20:23] = False
    return gt, pred


def test_correction_clicks_match_the_reference_on_several_regions_and_objects():
    gt, pred = regions_case()
    result = correction_clicks(torch.from_numpy(gt), torch.from_numpy(pred))
    clicks = device_clicks(*result)
    assert clicks == [ClickSimulator().next_click(g, p) for g, p in zip(gt, pred)]
    assert clicks[0] == ((12, 12), 1) and clicks[1][1] == 0 and clicks[1][0][0] < 5
    assert clicks[2] is None and result[1][2] == -1  # perfect: nothing to correct, padding label
    assert clicks[3] == ((11, 11), 1) and clicks[4][0][0] in (8, 9)


def test_correction_clicks_in_3d_with_anisotropic_spacing_match_the_reference():
    rng = np.random.default_rng(3)
    gt = np.zeros((4, 16, 14, 8), dtype=bool)
    gt[:, 3:13, 2:12, 1:7] = True
    pred = gt.copy()
    pred[0, 3:6] = False  # thin missed slab across i: 3 voxels of 0.7 mm
    pred[0, 0:2, :, :] = True  # false positive slab outside, larger than the miss
    pred[1, :, :, 6:8] = True  # false positive across k (3 mm voxels) that touches the border
    pred[2] = blocky(rng, (16, 14, 8))
    gt[3], pred[3] = False, False  # no object: the whole prediction is one false positive
    pred[3, 2:9, 2:9, 2:5] = True  # 4.9 x 4.9 x 9 mm: 2.8 mm from the i and j faces at every k, 3 mm from k's
    reference = ClickSimulator(spacing=SPACING_3D)
    clicks = device_clicks(*correction_clicks(torch.from_numpy(gt), torch.from_numpy(pred), SPACING_3D))
    assert clicks == [reference.next_click(g, p) for g, p in zip(gt, pred)]
    assert clicks[0][1] == 0 and clicks[3] == ((5, 5, 2), 0)  # the tie at k = 2, 3, 4 goes to the first


def test_a_model_that_ignores_clicks_gets_the_reference_sequence_of_new_clicks():
    grid = np.indices((16, 16, 16))
    gt = sum((g - 8) ** 2 for g in grid) <= 25
    seen: list = []
    interactive_loop(lambda prompts, prev: np.zeros(gt.shape), gt, 6, clicks_out=seen)
    target, nothing = torch.from_numpy(gt)[None], torch.zeros(1, 16, 16, 16, dtype=torch.bool)
    previous = torch.zeros(1, 0, 3)
    for coord, label in seen:
        coords, labels, valid = correction_clicks(target, nothing, previous_coords=previous)
        assert valid.item() and (tuple(coords[0].tolist()), labels.item()) == (coord, label)
        previous = torch.cat([previous, coords[:, None].float()], dim=1)


def test_previous_clicks_padding_out_of_range_and_exhausted_regions():
    gt = np.zeros((1, 8, 8), dtype=bool)
    gt[0, 2, 2] = True
    pred = np.zeros_like(gt)
    pred[0, 6, 6] = True  # two one-voxel regions: the missed one first
    target, current = torch.from_numpy(gt), torch.from_numpy(pred)
    reference = ClickSimulator()
    cases = [
        ([[2, 2]], [1], [((2, 2), 1)]),  # the missed voxel was clicked: the false positive next
        ([[2, 2], [6, 6]], [1, 0], [((2, 2), 1), ((6, 6), 0)]),  # both clicked: nothing left
        ([[2.4, 1.6], [6, 6]], [1, -1], [((2, 2), 1)]),  # float coordinates round; label -1 is padding
        ([[-1, 2], [8, 6]], [1, 1], []),  # outside the array: ignored
    ]
    for coords, labels, previous in cases:
        result = correction_clicks(target, current, None, torch.tensor([coords]), torch.tensor([labels]))
        assert device_clicks(*result) == [reference.next_click(gt[0], pred[0], previous)]
    repeat = correction_clicks(target, current, None, torch.tensor([[[2, 2]]]), avoid_repeats=False)
    assert device_clicks(*repeat) == [((2, 2), 1)]


@pytest.mark.parametrize(
    ("shape", "spacing", "connectivity"),
    [((16, 16), (1.0, 1.0), 1), ((15, 18), (0.7, 1.3), 2), ((9, 10, 8), SPACING_3D, 1), ((9, 10, 8), (1, 1, 1), 3)],
)
def test_random_masks_give_the_reference_clicks(shape, spacing, connectivity):
    rng = np.random.default_rng(4)
    count = 60
    gt = np.stack([blocky(rng, shape) for _ in range(count)])
    pred = np.stack([g ^ blocky(rng, shape, cell=2, flips=0.1) * (rng.random(shape) < 0.5) for g in gt])
    previous = rng.integers(0, shape, size=(count, 4, len(shape)))
    labels = rng.integers(-1, 2, size=(count, 4))
    reference = ClickSimulator(spacing=spacing, connectivity=connectivity)
    result = correction_clicks(
        torch.from_numpy(gt), torch.from_numpy(pred), spacing, torch.from_numpy(previous), torch.from_numpy(labels),
        connectivity,
    )  # fmt: skip
    expected = []
    for g, p, coords, labs in zip(gt, pred, previous, labels):
        given = [(tuple(int(v) for v in c), int(lab)) for c, lab in zip(coords, labs) if lab >= 0]
        expected.append(reference.next_click(g, p, given))
    assert device_clicks(*result) == expected
    assert sum(click is not None for click in expected) > count // 2
    coords, valid = first_clicks(torch.from_numpy(gt), spacing)
    firsts = [reference.first_click(g) if g.any() else None for g in gt]
    assert [(tuple(c), 1) if ok else None for c, ok in zip(coords.tolist(), valid.tolist())] == firsts


def test_float32_distances_give_the_reference_clicks_up_to_near_ties():
    rng = np.random.default_rng(5)
    shape, spacing = (9, 10, 8), SPACING_3D
    gt = np.stack([blocky(rng, shape) for _ in range(30)])
    pred = np.stack([blocky(rng, shape) for _ in range(30)])
    coords, labels, valid = correction_clicks(
        torch.from_numpy(gt), torch.from_numpy(pred), spacing, dtype=torch.float32
    )
    reference = ClickSimulator(spacing=spacing)
    for g, p, coord, label, ok in zip(gt, pred, coords.tolist(), labels.tolist(), valid.tolist()):
        expected = reference.next_click(g, p)
        assert ok == (expected is not None)
        if expected is None:
            continue
        (ref_coord, ref_label), coord = expected, tuple(coord)
        error = g & ~p if ref_label == 1 else p & ~g
        components, _ = ndimage.label(error)
        region = components == components[ref_coord]
        distance = reference_distance(region, spacing)
        assert label == ref_label and region[coord]
        assert distance[coord] == pytest.approx(distance[ref_coord], rel=1e-6)


def test_masks_are_thresholded_like_the_reference():
    gt = np.zeros((1, 12, 12), dtype=np.float32)
    gt[0, 2:9, 2:9] = 0.9
    gt[0, 5, 5] = 0.5  # not above 0.5: a hole
    pred = np.zeros((1, 12, 12), dtype=np.int64)
    pred[0, 2:9, 2:5] = 3
    reference = ClickSimulator().next_click(gt[0], pred[0])
    assert device_clicks(*correction_clicks(torch.from_numpy(gt), torch.from_numpy(pred))) == [reference]
    coords, _ = first_clicks(torch.from_numpy(gt))
    assert (tuple(coords[0].tolist()), 1) == ClickSimulator().first_click(gt[0])


def test_device_simulator_follows_a_reference_simulator():
    reference = ClickSimulator(spacing=(0.7, 1.3), connectivity=2, avoid_repeats=False)
    simulator = DeviceClickSimulator.like(reference)
    assert (simulator.spacing, simulator.connectivity, simulator.avoid_repeats) == ((0.7, 1.3), 2, False)
    gt, pred = regions_case()
    clicks = device_clicks(*simulator.correction_clicks(torch.from_numpy(gt), torch.from_numpy(pred)))
    assert clicks == [reference.next_click(g, p) for g, p in zip(gt, pred)]
    coords, valid = simulator.first_clicks(torch.from_numpy(gt))
    assert valid.all() and [tuple(c) for c in coords.tolist()] == [reference.first_click(g)[0] for g in gt]


def test_bad_inputs_are_refused_naming_the_argument():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    with pytest.raises(PromptError, match="gt must be a torch tensor"):
        first_clicks(np.zeros((2, 8, 8), dtype=bool))
    with pytest.raises(PromptError, match=r"gt must be a batch of 2D or 3D masks \[B, \*spatial\], got shape \(8, 8\)"):
        first_clicks(masks[0])
    with pytest.raises(PromptError, match=r"pred must be a batch"):
        correction_clicks(masks, masks[None, None])
    with pytest.raises(PromptError, match="same shape"):
        correction_clicks(masks, masks[:, :4])
    with pytest.raises(PromptError, match="spacing must hold 2 positive voxel sizes"):
        first_clicks(masks, (1.0, 1.0, 1.0))
    with pytest.raises(PromptError, match="spacing"):
        correction_clicks(masks, masks, (1.0, 0.0))
    with pytest.raises(PromptError, match=r"previous_coords must be \[B=2, K, 2\]"):
        correction_clicks(masks, masks, previous_coords=torch.zeros(2, 3))
    with pytest.raises(PromptError, match=r"previous_labels must be \[B, K\] = \(2, 3\)"):
        correction_clicks(masks, masks, previous_coords=torch.zeros(2, 3, 2), previous_labels=torch.zeros(2, 4))
    with pytest.raises(PromptError, match="connectivity must be 1..2"):
        correction_clicks(masks, masks, connectivity=3)
    with pytest.raises(PromptError, match="connectivity must be 1..2"):
        label_components(masks, 0)
    with pytest.raises(
        PromptError, match=r"spacing must hold 2 voxel sizes in mm \(one per spatial axis\), got \[1.0\]"
    ):
        distance_inside(masks, (1.0,))
    assert issubclass(PromptError, MedsegError)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_clicks_are_the_reference_clicks_and_syncs_do_not_grow_with_the_batch():
    rng = np.random.default_rng(6)
    for shape, spacing in (((64, 64), (1.0, 1.0)), ((24, 20, 12), SPACING_3D)):
        gt = np.stack([blocky(rng, shape) for _ in range(16)])
        pred = np.stack([blocky(rng, shape) for _ in range(16)])
        reference = ClickSimulator(spacing=spacing)
        target, current = torch.from_numpy(gt).cuda(), torch.from_numpy(pred).cuda()
        coords, labels, valid = correction_clicks(target, current, spacing)
        assert coords.device.type == "cuda"
        assert device_clicks(coords, labels, valid) == [reference.next_click(g, p) for g, p in zip(gt, pred)]
        firsts, _ = first_clicks(target, spacing)
        assert [tuple(c) for c in firsts.tolist()] == [reference.first_click(g)[0] for g in gt]

    def syncs(batch: int) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                first_clicks(target[:1].expand(batch, *shape), spacing)
                correction_clicks(target[:1].expand(batch, *shape), current[:1].expand(batch, *shape), spacing)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    one = syncs(1)
    assert syncs(16) == one <= 20  # sizes of nonzero and the labelling rounds' flags, never per object
