"""Click and box simulation: clicks at object and error-region centres in mm, never on correct voxels; boxes; mixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.prompts import (
    ClickSimulator,
    PromptError,
    Prompts,
    box_from_mask,
    interactive_loop,
    sample_object,
    sample_prompts,
)


def sphere(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape).astype(float)
    offset = [(g - c) * s for g, c, s in zip(grid, centre, spacing)]
    return sum(o**2 for o in offset) <= radius**2


def test_first_click_is_the_centre_of_a_sphere_and_of_an_ellipse_in_mm():
    gt = sphere((24, 24, 20), (10, 12, 9), 5)
    assert ClickSimulator().first_click(gt) == ((10, 12, 9), 1)
    spacing = (0.8, 0.8, 2.5)  # an ellipsoid in voxels that is a sphere in mm
    ellipse = sphere((30, 30, 12), (14, 15, 5), 8.0, spacing)
    assert ClickSimulator(spacing=spacing).first_click(torch.from_numpy(ellipse)) == ((14, 15, 5), 1)


def test_anisotropic_spacing_changes_which_part_is_the_interior():
    # Two blocks: A is 9 x 9 voxels, B 15 x 5. In voxels A's centre is 5 from the outside and B's 3, so A wins; with
    # 4 mm along j, A's centre is still 5 mm from its i-faces while B's is 8 mm from its i-faces (and 12 from j-faces).
    gt = np.zeros((20, 30), dtype=bool)
    gt[1:10, 1:10] = True  # A, centre (5, 5)
    gt[2:17, 20:25] = True  # B, centre (9, 22)
    assert ClickSimulator().first_click(gt)[0] == (5, 5)
    coord, _ = ClickSimulator(spacing=(1.0, 4.0)).first_click(gt)
    assert coord[0] == 9 and 21 <= coord[1] <= 23  # B's middle row; columns 21-23 are all 8 mm from the i-faces


def test_volume_border_counts_as_boundary():
    gt = np.zeros((12, 12), dtype=bool)
    gt[:, :6] = True  # touches three borders: without them as boundary, column 0 (6 from column 6) would win
    coord, _ = ClickSimulator().first_click(gt)
    assert coord[1] in (2, 3) and 2 <= coord[0] <= 9


def random_mask(rng, shape, sigma=1.5):
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return smooth > np.quantile(smooth, rng.uniform(0.4, 0.8))


@pytest.mark.parametrize(("shape", "spacing"), [((16, 16), (1.0, 1.0)), ((9, 10, 8), (0.7, 0.9, 3.0))])
def test_a_click_never_lands_on_a_voxel_that_is_already_correct(shape, spacing):
    rng = np.random.default_rng(0)
    simulator = ClickSimulator(spacing=spacing)
    for _ in range(60):
        gt, pred = random_mask(rng, shape), random_mask(rng, shape)
        previous = [(tuple(int(v) for v in rng.integers(0, shape)), 1) for _ in range(3)]
        click = simulator.next_click(gt, pred.astype(np.float32), previous)
        if (gt == pred).all():
            assert click is None
            continue
        coord, label = click
        assert gt[coord] != pred[coord]
        assert label == int(gt[coord])
        assert coord not in [c for c, _ in previous]
    assert simulator.next_click(gt, gt) is None


def test_the_click_goes_to_the_largest_error_region_with_the_right_label():
    gt = np.zeros((40, 40), dtype=bool)
    gt[5:35, 5:35] = True
    missed = gt.copy()
    missed[5:20, 5:35] = False  # large false negative band (15 x 30)
    missed[37:39, 37:39] = True  # small false positive (2 x 2)
    coord, label = ClickSimulator().next_click(gt, missed)
    assert (label == 1 and 5 <= coord[0] < 20 and coord == (12, 20)) or coord[0] == 12
    spilled = gt.copy()
    spilled[0:5, :] = True  # large false positive band (5 x 40)
    spilled[20, 20] = False  # one missed voxel
    coord, label = ClickSimulator().next_click(gt, spilled)
    assert label == 0 and coord[0] < 5


def test_a_model_that_ignores_clicks_gets_a_different_click_each_round():
    gt = sphere((16, 16, 16), (8, 8, 8), 5)
    seen = []
    masks = interactive_loop(lambda prompts, prev: np.zeros(gt.shape), gt, 5, clicks_out=seen)
    assert len(masks) == 5 and not any(m.any() for m in masks)
    assert len({c for c, _ in seen}) == 5 and all(label == 1 for _, label in seen)
    assert seen[0][0] == (8, 8, 8)


def test_interactive_loop_sends_all_clicks_the_box_and_the_previous_mask():
    gt = sphere((12, 12, 12), (6, 6, 6), 4)
    box = box_from_mask(gt)
    calls = []

    def predict(prompts: Prompts, prev):
        calls.append(prompts)
        assert (prev is None) == (prompts.prev_mask is None)
        return torch.from_numpy(gt[None, None] * 0.9 if prompts.point_coords is not None else np.zeros((12, 12, 12)))

    masks = interactive_loop(predict, gt, 3, box=box)
    assert calls[0].point_coords is None and calls[0].box[0].tolist() == box.tolist()
    assert calls[1].point_coords.shape == (1, 1, 3) and calls[1].prev_mask.shape == (1, 1, 12, 12, 12)
    assert (masks[0] == gt).all() and (masks[2] == gt).all()
    assert len(calls) == 2  # perfect after one click: nothing left to click, the mask is repeated


def test_box_is_tight_without_jitter_and_jitter_stays_within_bounds():
    mask = np.zeros((20, 30, 10), dtype=bool)
    mask[4:9, 10:21, 3:5] = True
    assert box_from_mask(mask).tolist() == [4, 10, 3, 8, 20, 4]
    tight = np.array([4, 10, 3, 8, 20, 4])
    boxes = np.stack([box_from_mask(mask, jitter_voxels=2, rng=seed) for seed in range(200)])
    assert np.abs(boxes - tight).max() == 2 and (boxes[:, 3:] >= boxes[:, :3]).all() and (boxes >= 0).all()
    side = np.array([5, 11, 2] * 2)
    relative = np.stack([box_from_mask(mask, jitter_fraction=0.2, rng=seed) for seed in range(200)])
    assert (np.abs(relative - tight) <= np.rint(0.2 * side)).all() and (relative != tight).any()
    assert box_from_mask(mask, jitter_voxels=3, rng=7).tolist() == box_from_mask(mask, jitter_voxels=3, rng=7).tolist()
    corner = np.zeros((8, 8), dtype=bool)
    corner[:3, 5:] = True
    clipped = np.stack([box_from_mask(corner, jitter_voxels=4, rng=s) for s in range(50)])
    assert clipped.min() >= 0 and clipped.max() <= 7 and clipped.shape == (50, 4)
    with pytest.raises(PromptError, match="empty"):
        box_from_mask(np.zeros((4, 4)))


def test_sample_object_returns_a_present_class_or_one_of_its_components():
    label = np.zeros((20, 20, 6), dtype=np.uint8)
    label[1:5, 1:5] = 2
    label[10:15, 10:15] = 2
    label[16:19, 1:4] = 5
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(30):
        mask, class_id = sample_object(label, rng)
        assert class_id in (2, 5) and (mask == (label == class_id)).all()
        mask, class_id = sample_object(label, rng, mode="component")
        components, _ = ndimage.label(label == class_id)
        assert mask.any() and (label[mask] == class_id).all()
        assert len(np.unique(components[mask])) == 1 and mask.sum() == (components == components[mask][0]).sum()
        seen.add((class_id, int(mask.sum())))
    assert seen == {(2, 96), (2, 150), (5, 54)}
    assert sample_object(label, rng, classes=[5])[1] == 5
    empty, class_id = sample_object(label, rng, classes=[7])
    assert class_id == 0 and not empty.any()


@pytest.mark.parametrize("kind", ["points", "box", "box+points"])
def test_sample_prompts_follows_the_mix_and_matches_the_target(kind):
    rng = np.random.default_rng(3)
    labels = torch.zeros(3, 1, 24, 24, dtype=torch.long)
    labels[:, 0, 3:10, 4:12] = 1
    labels[:, 0, 14:22, 14:20] = 2
    prompts, target = sample_prompts(labels, rng, mix={kind: 1.0}, max_points=4)
    assert target.shape == (3, 1, 24, 24) and prompts.class_vector.shape == (3, 1)
    for b in range(3):
        assert torch.equal(target[b, 0] > 0, labels[b, 0] == prompts.class_vector[b, 0])
    assert (prompts.box is not None) == ("box" in kind)
    assert (prompts.point_coords is not None) == (kind != "box")
    if prompts.box is not None:
        assert prompts.box.shape == (3, 4)
    if prompts.point_coords is not None:
        assert prompts.point_coords.shape[1] <= 4 and (prompts.point_labels[:, 0] == 1).all()
        for b in range(3):
            for coord, point_label in zip(prompts.point_coords[b].long(), prompts.point_labels[b]):
                if point_label >= 0:
                    assert target[b, 0][tuple(coord)] == point_label


def test_sample_prompts_mix_proportions_and_errors():
    rng = np.random.default_rng(0)
    labels = np.zeros((1, 1, 8, 8, 8), dtype=np.uint8)
    labels[0, 0, 2:6, 2:6, 2:6] = 1
    kinds = []
    for _ in range(200):
        prompts, _ = sample_prompts(labels, rng, mix={"points": 3, "box": 1}, max_points=2)
        kinds.append("box" if prompts.point_coords is None else "points")
        assert prompts.spatial_dims == 3
    assert 120 < kinds.count("points") < 180
    with pytest.raises(PromptError, match="mix"):
        sample_prompts(labels, rng, mix={"scribble": 1.0})
    with pytest.raises(PromptError, match=r"\[B, 1, \*spatial\]"):
        sample_prompts(labels[0], rng)


def plain_sample_prompts(labels: np.ndarray, rng: np.random.Generator, max_points: int) -> list:
    """The clicks-only rule written plainly (np.unique classes, voxels listed over the whole array): the oracle of
    sample_prompts' faster box-restricted draws, which must use the generator the same way."""
    out = []
    assert rng.choice(1, p=[1.0]) == 0  # the prompt type draw (one type in the mix)
    for item in labels[:, 0]:
        present = [int(v) for v in np.unique(item) if v != 0]
        if not present:
            out.append(None)
            continue
        class_id = int(rng.choice(present))
        target = item == class_id
        n = int(rng.integers(1, max_points + 1))
        n_pos = 1 + int(rng.binomial(n - 1, 0.5))
        inside = np.argwhere(target)
        positive = inside[rng.choice(len(inside), size=min(n_pos, len(inside)), replace=False)]
        nonzero = np.nonzero(target)
        lo, hi = np.array([a.min() for a in nonzero]), np.array([a.max() for a in nonzero])
        grow = np.maximum(2, (hi - lo) // 4)
        near = np.zeros_like(target)
        near[tuple(slice(a, b) for a, b in zip(np.maximum(lo - grow, 0), hi + grow + 1))] = True
        candidates = np.argwhere(~target & near if (~target & near).any() else ~target)
        count = n - len(positive)
        negative = candidates[rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)]
        out.append((class_id, np.concatenate([positive, negative if count > 0 else negative[:0]]).tolist()))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint8])
def test_sample_prompts_draws_what_the_plain_rule_draws(dtype):
    rng = np.random.default_rng(8)
    labels = np.zeros((6, 1, 30, 26), dtype=dtype)
    for b in range(4):
        for value in rng.choice([1, 2, 3, 7], size=2, replace=False):
            lo = rng.integers(0, 20, size=2)
            labels[b, 0, lo[0] : lo[0] + rng.integers(1, 10), lo[1] : lo[1] + rng.integers(1, 10)] = value
    labels[4, 0] = 3  # the object fills the array but one corner voxel: the only negative there is
    labels[4, 0, 0, 0] = 0
    labels[5, 0] = 2  # the object is the whole array: no negative at all
    for seed in range(5):
        prompts, _ = sample_prompts(labels, np.random.default_rng(seed), mix={"points": 1.0}, max_points=5)
        expected = plain_sample_prompts(labels, np.random.default_rng(seed), max_points=5)
        for b, want in enumerate(expected):
            if want is None:
                continue
            real = prompts.point_labels[b] >= 0
            assert prompts.class_vector[b, 0] == want[0]
            assert prompts.point_coords[b][real].long().tolist() == want[1]


def test_sample_object_reads_classes_stored_as_floats_or_beyond_a_byte():
    label = np.zeros((6, 6), dtype=np.float32)
    label[1:3, 1:3], label[4:, 4:] = 2.0, 9.0
    assert {sample_object(label, np.random.default_rng(s))[1] for s in range(20)} == {2, 9}
    wide = np.zeros((6, 6), dtype=np.int32)
    wide[0, 0], wide[5, 5] = 300, 1
    assert {sample_object(wide, np.random.default_rng(s))[1] for s in range(20)} == {1, 300}
    halves = label / 4  # 0.5 and 2.25: not integers, so np.unique's values are truncated as before
    assert {sample_object(halves, np.random.default_rng(s))[1] for s in range(20)} == {0, 2}
