"""Slice propagation: a bright-object tracker (carries, stop rules, cache, axes), then real LiteMedSAM on a tube."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import ConfigError
from medseg.inference.cache import EmbeddingCache
from medseg.inference.propagate import PropagationConfig, propagate
from medseg.models.promptable import build_promptable


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


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


@pytest.fixture(scope="module")
def litemedsam():
    return build_promptable("litemedsam").eval()


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
