"""The SegFM3D protocol's rules and metrics on constructed masks, with oracle sessions standing in for a model."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg.errors import ConfigError
from medseg.evaluation import build_summary, case_metrics, is_complete, score_case, write_summary
from medseg.evaluation import segfm3d as protocol
from medseg.evaluation.metrics import EvaluationError
from medseg.evaluation.segfm3d import (
    Segfm3dSettings,
    auc,
    challenge_box,
    challenge_click,
    protocol_per_case,
    run_case,
    step_scores,
    summarize_segfm3d,
    surface_dice,
)


def cube(shape=(24, 24, 16), lo=(4, 4, 4), side=6) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, a + side) for a in lo)] = True
    return mask


def test_auc_is_the_trapezoid_over_the_five_click_steps_by_hand():
    dscs = [0.1, 0.5, 0.6, 0.7, 0.8, 0.9]  # box step, then five clicks
    # (0.5 + 0.9) / 2 + 0.6 + 0.7 + 0.8 = 2.8: the box step's 0.1 is left out, steps are one unit apart
    assert auc(dscs) == pytest.approx(2.8)
    assert auc([0.0] + [1.0] * 5) == pytest.approx(4.0)  # a perfect curve: the range is [0, 4], not normalised
    assert auc([0.2, 0.4, 0.6], clicks=2) == pytest.approx(0.5)
    with pytest.raises(EvaluationError, match="5 click steps"):
        auc([0.5, 0.6])


def test_nsd_counts_surface_within_tolerance_by_area():
    gt = cube()
    assert surface_dice(gt, gt, (1, 1, 1), 2.0) == pytest.approx(1.0)
    assert surface_dice(gt, np.roll(gt, 1, axis=0), (1, 1, 1), 2.0) == pytest.approx(1.0)  # 1 mm off, within 2 mm
    assert surface_dice(gt, np.roll(gt, 12, axis=0), (1, 1, 1), 2.0) == 0.0  # disjoint and far
    assert surface_dice(gt, np.zeros_like(gt), (1, 1, 1), 2.0) == 0.0
    # two equal cubes in the reference, one predicted: its surface counts twice (both directions), the other's not
    both = gt | cube(lo=(14, 14, 4))
    assert surface_dice(both, gt, (1, 1, 1), 2.0) == pytest.approx(2 / 3, abs=1e-6)
    labels = {"background": 0, "a": 1}
    medseg_nsd = case_metrics(gt.astype(int), both.astype(int), (1, 1, 1), labels)["a"]["nsd"]
    assert medseg_nsd == pytest.approx(2 / 3, abs=1e-6)  # medseg's metric agrees where voxel and area counts coincide
    # a 3 mm shift (one 3 mm slice): a 2 mm tolerance loses the faces across it, a 3 mm one keeps every face
    assert 0.0 < surface_dice(gt, np.roll(gt, 1, axis=2), (1, 1, 3), 2.0) < 1.0
    assert surface_dice(gt, np.roll(gt, 1, axis=2), (1, 1, 3), 3.0) == pytest.approx(1.0)


def test_nsd_is_computed_only_above_a_mean_dsc_of_0_2():
    reference = cube().astype(np.int64) + 2 * cube(lo=(14, 14, 4))
    settings = Segfm3dSettings()
    good = step_scores(reference, reference, {"a": 1, "b": 2}, (1, 1, 1), settings)
    assert good["dsc"] == pytest.approx(1.0) and good["nsd"] == pytest.approx(1.0)
    poor = np.where(reference == 1, 1, 0)  # class a perfect, b missing: mean DSC 0.5 > 0.2
    scores = step_scores(reference, poor, {"a": 1, "b": 2}, (1, 1, 1), settings)
    assert scores["dsc"] == pytest.approx(0.5) and scores["nsd"] == pytest.approx(0.5)
    sliver = np.zeros_like(reference)
    sliver[4, 4, 4:8] = 1  # 4 of class a's 216 voxels: mean DSC 0.018 / 2 <= 0.2
    low = step_scores(reference, sliver, {"a": 1, "b": 2}, (1, 1, 1), settings)
    assert 0 < low["dsc"] <= 0.2 and low["nsd"] == 0.0 and low["per_class"]["a"]["nsd"] is None


def test_clicks_go_to_the_centre_of_the_largest_error_positive_where_missed():
    gt = cube(lo=(2, 2, 2), side=5)
    assert challenge_click(gt, np.zeros_like(gt)) == ((4, 4, 4), 1)  # under-segmented: the object's centre, positive
    assert challenge_click(gt, gt) is None  # nothing to correct
    # over-segmentation: a 5-voxel-thick slab of false positives, larger than anything missed
    pred = gt.copy()
    pred[14:19, :, :] = True
    coord, label = challenge_click(gt, pred)
    assert label == 0 and coord[0] == 16 and pred[coord] and not gt[coord]  # the slab's middle plane, negative
    # the largest error wins whatever its kind: a missed 5^3 cube against a 3^3 false positive
    pred = np.zeros_like(gt)
    pred[10:13, 10:13, 10:13] = True
    assert challenge_click(gt, pred) == ((4, 4, 4), 1)


def test_errors_touching_at_a_corner_are_one_component_and_the_border_counts_as_outside():
    gt = np.zeros((12, 12, 12), dtype=bool)
    gt[0:3, 0:3, 0:3] = True  # 27 voxels against the volume's corner ...
    gt[3:6, 3:6, 3:6] = True  # ... and 27 more touching it only at a corner (26-connectivity joins them)
    pred = np.zeros_like(gt)
    pred[7:11, 7:11, 7:10] = True  # 48 false positives: more than either cube (27), fewer than both (54)
    coord, label = challenge_click(gt, pred)
    assert label == 1 and gt[coord]
    assert coord in {(1, 1, 1), (4, 4, 4)}  # a cube's centre: the border is outside, so (0, 0, 0) is not deepest
    structure = ndimage.generate_binary_structure(3, 1)
    assert ndimage.label(gt, structure=structure)[1] == 2  # faces-only connectivity would split them (and lose)


def test_ties_are_drawn_as_the_challenge_draws_them():
    gt = np.zeros((10, 10, 10), dtype=bool)
    gt[2:4, 2:4, 2:4] = True  # 8 voxels, all at distance 1 from the outside
    first = challenge_click(gt, np.zeros_like(gt))
    ties = np.argwhere(gt)
    assert first == (tuple(int(v) for v in ties[np.random.RandomState(42).choice(len(ties))]), 1)
    assert challenge_click(gt, np.zeros_like(gt)) == first  # seeded per click, so the same every time


def test_the_box_is_the_slice_range_and_the_in_plane_box_of_the_median_voxels_slice():
    mask = np.zeros((20, 20, 10), dtype=bool)
    mask[5:8, 5:8, 2] = True  # 9 voxels on slice 2
    mask[2:15, 3:12, 3] = True  # 117 on slice 3: the median voxel lies here
    mask[9, 9, 6] = True
    box = challenge_box(mask, axis=2, max_shift=5, rng=0)
    assert box.mid == 3 and (box.lo, box.hi) == ((2, 3, 2), (14, 11, 6))  # small images: the shift rounds to 0
    assert box.box6().tolist() == [2, 3, 2, 14, 11, 6]
    big = np.zeros((512, 512, 4), dtype=bool)
    big[100:200, 150:300, 1:3] = True
    shifted = challenge_box(big, axis=2, max_shift=5, rng=np.random.default_rng(3))
    widen = 99 + 1 - shifted.lo[0]  # 512 / 256 = 2 pixels per unit of shift
    assert widen % 2 == 0 and 0 <= widen <= 10 and shifted.hi[0] == 199 + widen and shifted.lo[1] == 150 - widen
    assert challenge_box(big, axis=2, max_shift=0).lo == (100, 150, 1)
    with pytest.raises(EvaluationError, match="non-empty"):
        challenge_box(np.zeros((4, 4, 4)))


class Oracle:
    """A session whose box fills the box and whose click fixes the whole error component under it (26-connected).
    It asserts that each click lands where its own last mask was wrong, with the label that corrects it."""

    def __init__(self, target: np.ndarray):
        self.target, self.mask, self.boxes = target, np.zeros_like(target), []

    def box(self, box):
        self.boxes.append(box)
        self.mask = np.zeros_like(self.target)
        self.mask[tuple(slice(a, b + 1) for a, b in zip(box.lo, box.hi))] = True
        return self.mask.copy()

    def click(self, clicks):
        coord, label = clicks[-1]
        assert self.mask[coord] != self.target[coord] and label == int(self.target[coord])
        components, _ = ndimage.label(self.mask != self.target, structure=np.ones((3, 3, 3)))
        region = components == components[coord]
        self.mask[region] = self.target[region]
        return self.mask.copy()


def reference_two_classes() -> np.ndarray:
    reference = np.zeros((24, 24, 12), dtype=np.int64)
    reference[3:10, 3:10, 2:9] = 1
    reference[3:10, 10:16, 2:4] = 1  # a shelf on slices 2-3 only: the box of the median slice (4) leaves it out
    reference[14:20, 12:22, 3:7] = 2
    reference[15:18, 13:16, 3:7] = 0  # a hole the box fills: an over-segmentation to correct
    return reference


def test_a_case_has_six_steps_final_equal_to_the_last_and_clicks_by_the_rules():
    reference = reference_two_classes()
    classes = {"a": 1, "b": 2}
    sessions = {name: Oracle(reference == value) for name, value in classes.items()}
    result, label_map = run_case(sessions, reference, classes, (1.0, 1.0, 2.0), Segfm3dSettings())
    assert len(result["dsc"]) == len(result["nsd"]) == len(result["step_seconds"]) == 6
    assert result["final_dsc"] == result["dsc"][-1] and result["final_nsd"] == result["nsd"][-1]
    assert result["dsc_auc"] == pytest.approx(auc(result["dsc"]))
    assert result["nsd_auc"] == pytest.approx(auc(result["nsd"]))
    assert result["dsc"][0] < 1.0 and result["final_dsc"] == pytest.approx(1.0)  # the oracle's clicks fix everything
    assert result["dsc"] == sorted(result["dsc"])
    a, b = result["per_class"]["a"], result["per_class"]["b"]
    assert a["clicks"][0][3] == 1 and reference[tuple(a["clicks"][0][:3])] == 1  # the missed tip: positive
    assert b["clicks"][0][3] == 0 and reference[tuple(b["clicks"][0][:3])] == 0  # the filled hole: negative
    assert len(a["clicks"]) <= 5 and a["box"][2] == 2 and a["box"][5] == 8 and a["box"][6] == 4  # z range, z_mid
    assert np.array_equal(label_map, reference)
    assert result["total_seconds"] >= 0 and result["failed_at_step"] is None and result["time_limit_s"] is None
    json.dumps(result, allow_nan=False)


def test_without_a_box_the_first_step_scores_zero_and_clicks_start_at_the_centre():
    reference = np.zeros((16, 16, 9), dtype=np.int64)
    reference[2:9, 2:9, 1:8] = 1
    sessions = {"a": Oracle(reference == 1)}
    result, _ = run_case(sessions, reference, {"a": 1}, (1, 1, 1), Segfm3dSettings(box=False))
    assert result["dsc"][0] == 0.0 and result["nsd"][0] == 0.0 and result["step_seconds"][0] == 0.0
    assert sessions["a"].boxes == [] and result["per_class"]["a"]["clicks"][0] == [5, 5, 4, 1]
    assert result["dsc"][1] == pytest.approx(1.0)  # the oracle fills the whole object from its first click


def test_a_step_past_the_time_limit_fails_and_ends_the_case(monkeypatch):
    reference = reference_two_classes()
    ticks = iter(range(1000))  # a clock that advances one second per reading: each step takes 1 s
    monkeypatch.setattr(protocol.time, "perf_counter", lambda: float(next(ticks)))
    sessions = {"a": Oracle(reference == 1)}
    settings = Segfm3dSettings(time_limit_per_class_s=1.5)
    result, label_map = run_case(sessions, reference, {"a": 1}, (1, 1, 1), settings)
    assert result["time_limit_s"] == 1.5 and result["failed_at_step"] == 2  # 2 s used after the second step
    assert result["dsc"][0] > 0 and result["dsc"][1:] == [0.0] * 5 and not label_map.any()
    assert result["step_seconds"] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0] and result["total_seconds"] == 2.0


def test_settings_refuse_unknown_keys_and_bad_values():
    assert Segfm3dSettings.from_mapping({"time_limit_per_class_s": 90}).time_limit_per_class_s == 90
    with pytest.raises(ConfigError, match="unknown keys"):
        Segfm3dSettings.from_mapping({"click": 5})
    with pytest.raises(ConfigError, match="clicks >= 1"):
        Segfm3dSettings.from_mapping({"clicks": 0})
    with pytest.raises(ConfigError, match="time_limit_per_class_s"):
        Segfm3dSettings.from_mapping({"time_limit_per_class_s": 0})


def test_the_summary_section_means_cases_and_reads_back_per_case(tmp_path):
    reference = reference_two_classes()
    classes = {"a": 1, "b": 2}
    settings = Segfm3dSettings()
    oracles = {n: Oracle(reference == v) for n, v in classes.items()}
    first, _ = run_case(oracles, reference, classes, (1, 1, 1), settings)
    second, _ = run_case({"a": Oracle(reference == 1)}, reference, {"a": 1}, (1, 1, 1), Segfm3dSettings(box=False))
    section = summarize_segfm3d({"c1": first, "c2": second, "c3": {"classes": [], "skipped": "empty"}}, settings)
    mean = section["mean"]
    assert section["name"] == "segfm3d" and mean["n_cases"] == 2 and mean["n_skipped"] == 1
    assert mean["dsc_auc"] == pytest.approx((first["dsc_auc"] + second["dsc_auc"]) / 2)
    assert mean["dsc"][0] == pytest.approx(first["dsc"][0] / 2)  # the box-less case's first step counts as 0
    labels = {"background": 0, "a": 1, "b": 2}
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(reference.astype(np.uint8), affine), tmp_path / "reference.nii.gz")
    scored = []
    for case in ("c1", "c2", "c3"):
        nib.save(nib.Nifti1Image(reference.astype(np.uint8), affine), tmp_path / f"{case}.nii.gz")
        scored.append(score_case(tmp_path / f"{case}.nii.gz", tmp_path / "reference.nii.gz", labels))
    summary = build_summary(scored, labels, {"protocol": section})
    assert is_complete(write_summary(tmp_path / "summary.json", summary))
    table = protocol_per_case(summary)
    assert set(table) == {"c1", "c2"} and table["c2"]["final_dsc"] == second["final_dsc"]
    assert set(table["c1"]) == {"dsc_auc", "nsd_auc", "final_dsc", "final_nsd", "seconds_per_step"}
    with pytest.raises(EvaluationError, match="segfm3d"):
        protocol_per_case({"metric_per_case": []})
