"""SAM 2 memory propagation (``medseg.inference.sam2_propagation``) with a tiny SAM 2 built from ``sam2``'s classes.

No SAM 2 weights can be downloaded here: the model is the real Hiera-T / memory architecture with a 16-wide trunk at
64 px and ``sam2``'s random initialisation, so these tests check mechanics (which slices are tracked, from which
memory, where the rules stop, what a correction recomputes), never segmentation quality. The object-presence head's
bias is raised so that SAM 2.1's occlusion head declares the object present (a random head would blank every mask).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.backbones.sam2 import build_sam2_components
from medseg.backbones.sam2_configs import MISSING_EXTRA, require_sam2
from medseg.errors import ConfigError
from medseg.inference.propagate import PropagationConfig
from medseg.inference.recipe import SliceRecipe
from medseg.inference.sam2_frames import Sam2Frames, is_sam2_model, unit_volume
from medseg.inference.sam2_propagation import Sam2Tracker
from medseg.prompts.contract import Prompts

try:
    require_sam2()
except ConfigError:
    pytest.skip(MISSING_EXTRA, allow_module_level=True)

SIZE = 64
TINY = {"embed_dim": 16, "stages": [1, 1, 2, 1], "global_att_blocks": [3], "num_heads": 1}
NO_RULES = PropagationConfig(min_iou=None, min_area=None, max_area=None)
BOX = (8, 10, 27, 33)  # (i0, j0, i1, j1) on the middle slice of the tube


def tiny_sam2() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_sam2_components("sam2_hiera_t", pretrained=False, img_size=SIZE, arch=TINY).model.eval()
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_sam2()


@pytest.fixture(scope="module")
def tube() -> np.ndarray:
    """``(9, 36, 44)`` uint8-valued slices (0 and 255 present): a bright disc drifting one pixel per slice."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 40, (9, 36, 44)).astype(np.float32)
    ii, jj = np.mgrid[:36, :44]
    for k in range(9):
        volume[k][(ii - 18) ** 2 + (jj - 18 - k) ** 2 < 64] = 220
    volume[0, 0, 0], volume[0, 0, 1] = 0, 255
    return volume


def run(model, tube, config=NO_RULES, start=4) -> tuple[Sam2Tracker, object]:
    frames = Sam2Frames(model, unit_volume(tube, SliceRecipe("none")))
    tracker = Sam2Tracker(frames, config)
    with torch.inference_mode():
        tracker.prompt(start, Prompts.single(BOX))
    return tracker, tracker.propagate(start)


@pytest.fixture(scope="module")
def free(model, tube):
    """The tube propagated from its middle slice without stop rules (read-only for the tests that share it)."""
    return run(model, tube)


def test_prompted_slice_is_sam2_image_predictors_mask(model, tube, free):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    tracker, _ = free
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(SIZE // 4,) * 2, (SIZE // 8,) * 2, (SIZE // 16,) * 2]  # hard-coded for 1024 px
    rgb = np.repeat(tube[4].astype(np.uint8)[..., None], 3, axis=-1)
    i0, j0, i1, j1 = BOX
    with torch.inference_mode():
        predictor.set_image(rgb)
        masks, _, _ = predictor.predict(box=np.array([j0, i0, j1, i1], dtype=np.float32), multimask_output=False)
    expected = masks[0].astype(bool)
    assert expected.any() and not expected.all()
    assert np.array_equal(tracker.masks[4], expected)


def test_memory_reaches_both_ends_encoding_each_slice_once(model, free):
    tracker, walk = free
    assert is_sam2_model(model) and tracker.anchor == 4
    assert (walk.first, walk.last) == (0, 8) and walk.stopped == {"forward": "edge", "backward": "edge"}
    assert tracker.frames.encoded == 9
    assert sorted(tracker.outputs["cond_frame_outputs"]) == [4]
    assert sorted(tracker.outputs["non_cond_frame_outputs"]) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert tracker.volume_mask().shape == (9, 36, 44) and all(tracker.volume_mask()[k].any() for k in range(9))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


@pytest.mark.parametrize("rule", ["iou", "growth", "area"])
def test_stop_rules_stop_at_the_slice_the_masks_say(model, tube, free, rule):
    """Memory up to a stop is the same as without rules, so the free run's masks say where each rule must stop."""
    masks = free[0].masks
    area0 = float(masks[4].sum())
    metric = {
        "iou": lambda k: _iou(masks[k], masks[k - 1]),
        "growth": lambda k: float(masks[k].sum()) / area0,
        "area": lambda k: float(masks[k].sum()) / area0,
    }[rule]
    values = [metric(k) for k in range(5, 9)]
    sign = -1 if rule == "growth" else 1  # growth stops above the threshold, the others below
    j = int(np.argmin([sign * v for v in values]))
    earlier = [sign * v for v in values[:j]]
    bound = sign * (sign * values[j] + min(earlier, default=sign * values[j] + 1.0)) / 2
    settings = {"iou": {"min_iou": bound}, "growth": {"max_area": bound}, "area": {"min_area": bound}}[rule]
    config = PropagationConfig(**{"min_iou": None, "min_area": None, "max_area": None, **settings})
    stopped, walk = run(model, tube, config)
    assert walk.stopped["forward"] == rule and walk.last == 4 + j
    assert 5 + j not in stopped.outputs["non_cond_frame_outputs"]  # the stopping slice leaves no memory
    for k in range(4, 5 + j):
        assert np.array_equal(stopped.masks[k], masks[k])


def test_correction_repropagates_only_onward(model, tube):
    tracker, _ = run(model, tube)
    before = dict(tracker.outputs["non_cond_frame_outputs"])
    masks = {k: m.copy() for k, m in tracker.masks.items()}
    old = before[6]["pred_masks"].clone()
    walk = tracker.correct(6, Prompts.single(points=[[18, 30]], point_labels=[0]))
    after = tracker.outputs["non_cond_frame_outputs"]
    assert walk.stopped == {"forward": "edge"} and 6 in tracker.outputs["cond_frame_outputs"] and 6 not in after
    assert not torch.equal(tracker.outputs["cond_frame_outputs"][6]["pred_masks"], old)
    for k in (0, 1, 2, 3, 5):  # before the corrected slice: the same outputs, untouched
        assert after[k] is before[k] and np.array_equal(tracker.masks[k], masks[k])
    assert all(after[k] is not before[k] for k in (7, 8))  # after it: tracked again with the new memory
    assert tracker.frames.encoded == 9  # the slices' features were kept

    back = dict(after)
    tracker.correct(2, Prompts.single(points=[[18, 20]], point_labels=[1]))
    assert all(tracker.outputs["non_cond_frame_outputs"][k] is back[k] for k in (3, 5, 7, 8))
    assert tracker.outputs["non_cond_frame_outputs"][1] is not back[1]
    assert sorted(tracker.outputs["cond_frame_outputs"]) == [2, 4, 6]


def test_bad_prompts_and_ranges_are_refused(model, tube):
    tracker = Sam2Tracker(Sam2Frames(model, unit_volume(tube, SliceRecipe("none"))))
    with torch.inference_mode():
        tracker.prompt(4, Prompts.single(BOX))
    with pytest.raises(ConfigError, match="box or at least one click"):
        tracker.prompt(3, Prompts.single(points=[[1, 1]], point_labels=[-1]))
    with pytest.raises(ConfigError, match="holds no prompt"):
        tracker.propagate(3)
    with pytest.raises(ConfigError, match="must hold slice 4"):
        tracker.propagate(4, lo=5)
    with pytest.raises(ConfigError, match="not a SAM 2 model"):
        Sam2Frames(torch.nn.Linear(2, 2), np.zeros((2, 4, 4)))


def test_a_fine_tuned_models_backbone_encodes_its_frames(model, tube):
    """A model holding ``sam2`` and its encoder as a ``Sam2Backbone`` (where adapters sit) is encoded through the
    backbone, with the same projections ``forward_image`` adds: without adapters the features are SAM 2's own."""
    from medseg.backbones.sam2 import Sam2Backbone

    class FineTuned(torch.nn.Module):
        def __init__(self, sam2):
            super().__init__()
            self.sam2, self.backbone = sam2, Sam2Backbone(sam2.image_encoder, image_size=SIZE)

    slices = unit_volume(tube, SliceRecipe("none"))
    bare, held = Sam2Frames(model, slices), Sam2Frames(FineTuned(model), slices)
    assert bare.backbone is None and held.backbone is not None and held.model is model
    calls = []
    held.backbone.encode = lambda x, encode=held.backbone.encode: calls.append(x.shape) or encode(x)
    with torch.inference_mode():
        ours, theirs = bare.features(3)[0], held.features(3)[0]
    assert calls == [(1, 1, SIZE, SIZE)]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_correction_beyond_the_objects_reach_fills_the_gap_back(model, tube):
    tracker = Sam2Tracker(Sam2Frames(model, unit_volume(tube, SliceRecipe("none"))), NO_RULES)
    with torch.inference_mode():
        tracker.prompt(4, Prompts.single(BOX))
    tracker.propagate(4, lo=3, hi=5)
    kept = dict(tracker.outputs["non_cond_frame_outputs"])
    assert sorted(kept) == [3, 5]
    walk = tracker.correct(8, Prompts.single(points=[[18, 26]], point_labels=[1]))
    assert walk.stopped == {"forward": "edge", "backward": "edge"} and (walk.first, walk.last) == (3, 8)
    after = tracker.outputs["non_cond_frame_outputs"]
    assert sorted(after) == [3, 5, 6, 7] and after[3] is kept[3] and after[5] is kept[5]  # only the gap was tracked


def test_a_correction_that_decodes_empty_beyond_the_objects_reach_ends_the_walk(model, tube, monkeypatch):
    """A correction click whose slice decodes to nothing (kept as no mask) stops the walk back there: "empty"."""
    tracker = Sam2Tracker(Sam2Frames(model, unit_volume(tube, SliceRecipe("none"))), NO_RULES)
    with torch.inference_mode():
        tracker.prompt(4, Prompts.single(BOX))
    tracker.propagate(4, lo=3, hi=5)
    decode = Sam2Tracker._mask
    monkeypatch.setattr(Sam2Tracker, "_mask", lambda self, low_res: decode(self, low_res) & False)
    walk = tracker.correct(8, Prompts.single(points=[[18, 26]], point_labels=[0]))
    assert 8 not in tracker.masks and walk.stopped["backward"] == "empty"
    assert (walk.first, walk.last) == (3, 5)  # the object as it was: nothing added from the empty click
