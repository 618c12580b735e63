"""Metrics against values counted by hand on small masks, and every branch of the empty-label policy."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.evaluation import EvaluationError, case_metrics, foreground_classes, spacing_from_affine

LABELS = {"background": 0, "organ": 1}


def cube(shape=(14, 14, 14), start=(2, 2, 2), size=6, value=1) -> np.ndarray:
    array = np.zeros(shape, dtype=np.uint8)
    array[tuple(slice(s, s + size) for s in start)] = value
    return array


def test_dice_by_counting():
    reference = cube()
    prediction = cube(start=(3, 2, 2))  # overlap 5 x 6 x 6 = 180 of 216 + 216 voxels
    result = case_metrics(prediction, reference, (1.0, 1.0, 1.0), LABELS)["organ"]
    assert result["dice"] == pytest.approx(2 * 180 / 432, abs=1e-6)
    assert (result["n_ref"], result["n_pred"]) == (216, 216)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_of_offset_cubes_is_offset_times_spacing(axis):
    # Every surface voxel of the leading face is exactly 3 voxels from the other cube's surface and nothing is
    # farther, and that face is 36 of 152 surface voxels (> 5 %), so the 95th percentile is 3 voxels along `axis`.
    spacing = (2.0, 0.5, 1.25)
    start = [2, 2, 2]
    start[axis] += 3
    result = case_metrics(cube(start=tuple(start)), cube(), spacing, LABELS)["organ"]
    assert result["hd95"] == pytest.approx(3 * spacing[axis], abs=1e-5)


def test_nsd_of_shifted_cube_below_and_above_tolerance():
    # Shift by one voxel (2 mm) along x. Surface voxels at distance 0: the four rings x=3..6 (80) and the ring of the
    # trailing face (20) on each cube: 200 of 2 x 152; all others are 1 or 2 mm away, so a 2.5 mm tolerance accepts all.
    spacing = (2.0, 1.0, 1.0)
    prediction, reference = cube(start=(3, 2, 2)), cube()
    below = case_metrics(prediction, reference, spacing, LABELS, nsd_tolerance_mm=0.5)["organ"]["nsd"]
    above = case_metrics(prediction, reference, spacing, LABELS, nsd_tolerance_mm=2.5)["organ"]["nsd"]
    assert below == pytest.approx(200 / 304, abs=1e-6)
    assert above == pytest.approx(1.0)


def test_nsd_per_class_tolerance():
    spacing = (2.0, 1.0, 1.0)
    reference = cube() + cube(start=(8, 8, 8), size=4, value=2)
    prediction = np.roll(reference, 1, axis=0)
    labels = {"background": 0, "a": 1, "b": 2}
    result = case_metrics(prediction, reference, spacing, labels, nsd_tolerance_mm={"a": 2.5, "b": 0.5})
    assert result["a"]["nsd"] == pytest.approx(1.0)
    assert result["b"]["nsd"] < 1.0
    with pytest.raises(EvaluationError, match="'b'"):
        case_metrics(prediction, reference, spacing, labels, nsd_tolerance_mm={"a": 2.0})


def test_empty_policy_both_empty():
    empty = np.zeros((8, 8, 8), dtype=np.uint8)
    assert case_metrics(empty, empty, (1, 1, 1), LABELS)["organ"] == {
        "dice": 1.0, "hd95": 0.0, "nsd": 1.0, "n_ref": 0, "n_pred": 0,
    }  # fmt: skip


def test_empty_policy_reference_empty_prediction_not():
    result = case_metrics(cube(), np.zeros((14, 14, 14), np.uint8), (1, 1, 1), LABELS)["organ"]
    assert result == {"dice": 0.0, "hd95": None, "nsd": 0.0, "n_ref": 0, "n_pred": 216}


def test_empty_policy_prediction_empty_reference_not():
    result = case_metrics(np.zeros((14, 14, 14), np.uint8), cube(), (1, 1, 1), LABELS)["organ"]
    assert result == {"dice": 0.0, "hd95": None, "nsd": 0.0, "n_ref": 216, "n_pred": 0}


def test_multiclass_and_regions():
    reference = cube(value=1)
    reference[4:6, 4:6, 4:6] = 2  # class 2 inside class 1
    prediction = reference.copy()
    prediction[4:6, 4:6, 4:6] = 1  # class 2 missed, labelled 1 instead
    labels = {"background": 0, "organ": 1, "lesion": 2, "whole": [1, 2]}
    result = case_metrics(prediction, reference, (1, 1, 1), labels)
    assert set(result) == {"organ", "lesion", "whole"}
    assert result["organ"]["dice"] == pytest.approx(2 * 208 / (208 + 216))
    assert result["lesion"] == {"dice": 0.0, "hd95": None, "nsd": 0.0, "n_ref": 8, "n_pred": 0}
    assert result["whole"]["dice"] == pytest.approx(1.0) and result["whole"]["hd95"] == pytest.approx(0.0)


def test_foreground_classes_skip_background_and_ignore():
    assert foreground_classes({"background": 0, "a": 1, "ignore": 3, "r": [1, 2]}) == {"a": (1,), "r": (1, 2)}


def test_spacing_from_oblique_permuted_affine():
    angle = np.deg2rad(20)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    permutation = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]])  # LIA-like axes
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permutation @ np.diag([0.7, 1.2, 3.0])
    assert spacing_from_affine(affine) == pytest.approx((0.7, 1.2, 3.0))


def test_shape_and_spacing_errors():
    with pytest.raises(EvaluationError, match="native grid"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1), LABELS)
    with pytest.raises(EvaluationError, match="positive"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1), LABELS)
