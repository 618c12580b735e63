"""Interactive metrics with an oracle model (each click fixes the error region it lands in) and a constant model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.evaluation.interactive import (
    MAX_CLICKS,
    dice,
    evaluate_case_interactive,
    evaluate_object,
    middle_slice_box,
    noc,
    summarize_interactive,
)
from medseg.evaluation.metrics import EvaluationError
from medseg.prompts import Prompts

SIDES = (10, 5, 4, 3, 3)  # squares, far apart: the oracle needs one click per square, largest first


def squares(sides=SIDES, shape=(40, 40), value=1) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    corners = [(1, 1), (1, 20), (20, 1), (20, 20), (30, 30)]
    for side, (i, j) in zip(sides, corners):
        label[i : i + side, j : j + side] = value
    return label


def oracle(gt: np.ndarray):
    """A model that, per click, corrects the whole connected error region under the newest click; a box fills it."""

    def predict(prompts: Prompts, prev):
        if prompts.point_coords is None:
            lo, hi = prompts.box[0, : gt.ndim].long(), prompts.box[0, gt.ndim :].long()
            filled = np.zeros(gt.shape, dtype=np.float32)
            filled[tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))] = 1.0
            return filled
        pred = np.zeros(gt.shape, dtype=bool) if prev is None else prev[0, 0].numpy() > 0.5
        real = prompts.point_labels[0] >= 0
        click = tuple(int(v) for v in prompts.point_coords[0][real][-1])
        components, _ = ndimage.label(pred != gt)
        region = components == components[click]
        pred[region] = gt[region]
        return torch.from_numpy(pred.astype(np.float32))[None, None]

    return predict


def test_dice_follows_the_empty_policy():
    a = squares()
    assert dice(a, a) == 1.0 and dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    half = a.copy()
    half[:, :20] = 0
    assert dice(half, a) == pytest.approx(2 * half.sum() / (half.sum() + a.sum()))
    with pytest.raises(EvaluationError):
        dice(a, a[:-1])


def test_noc_is_the_first_click_reaching_the_threshold_capped():
    assert noc([0.5, 0.86, 0.91], 0.85) == 2 and noc([0.5, 0.86, 0.91], 0.90) == 3
    assert noc([0.5] * 30, 0.85) == MAX_CLICKS and noc([0.95], 0.9, max_clicks=5) == 1


def test_oracle_dice_at_k_increases_and_noc_matches_the_covered_area():
    gt = squares().astype(bool)
    result = evaluate_object(oracle(gt), gt)
    areas = np.array(SIDES) ** 2
    covered = np.cumsum(areas)
    expected = list(2 * covered / (covered + areas.sum())) + [1.0] * (10 - len(SIDES))
    np.testing.assert_allclose(result["dice_at_k"], expected, rtol=1e-6)
    assert all(b >= a for a, b in zip(result["dice_at_k"], result["dice_at_k"][1:]))
    assert result["dice_at_k"][0] < result["dice_at_k"][-1] == 1.0
    assert result["noc85"] == next(k for k, d in enumerate(expected, 1) if d >= 0.85)
    assert result["noc90"] == next(k for k, d in enumerate(expected, 1) if d >= 0.90)
    assert result["noc85"] < result["noc90"]  # the sides are chosen so the two thresholds differ
    assert result["clicks"] == len(SIDES)  # perfect after one click per square: no further clicks
    bbox = np.zeros_like(gt)
    bbox[1:33, 1:33] = True
    assert result["box_dice"] == pytest.approx(dice(bbox, gt))


def test_false_positives_are_removed_by_negative_clicks():
    gt = squares((10,)).astype(bool)
    spill = np.zeros_like(gt)
    spill[25:35, 25:39] = True  # the box-free model starts from a wrong blob; the oracle removes it on a 0 click

    def predict(prompts, prev):
        base = oracle(gt)(prompts, None if prev is None else prev)
        if prev is None:
            base = base.clone()
            base[0, 0][torch.from_numpy(spill)] = 1.0
        return base

    result = evaluate_object(predict, gt, box=False)
    assert result["dice_at_k"][0] < 1.0 and result["dice_at_k"][1] == 1.0 and result["noc90"] == 2


def test_a_constant_model_never_reaches_the_thresholds():
    gt = squares().astype(bool)
    result = evaluate_object(lambda prompts, prev: np.zeros(gt.shape), gt, spacing_mm=(0.8, 2.0))
    assert result["noc85"] == result["noc90"] == MAX_CLICKS
    assert result["dice_at_k"] == [0.0] * 10 and result["clicks"] == MAX_CLICKS and result["box_dice"] == 0.0


def test_case_results_per_component_and_propagation_summarise_per_class():
    reference = np.zeros((24, 24, 9), dtype=np.uint8)
    reference[2:12, 2:12, 1:8] = 1
    reference[15:20, 15:22, 3:6] = 1
    reference[2:8, 16:22, 2:5] = 2
    seen_boxes = []

    def propagate(box):
        seen_boxes.append(box)
        return reference > 0  # the union: Dice below 1 for a single component

    cases = {}
    for case in ("a", "b"):
        objects = []
        for value, name in ((1, "liver"), (2, "spleen")):
            components, count = ndimage.label(reference == value)
            for c in range(1, count + 1):
                mask = components == c
                scores = evaluate_object(oracle(mask), mask, propagate_fn=propagate)
                objects.append({"class": name, "component": c, **scores})
        cases[case] = objects
    assert all(box[2] == box[5] for box in seen_boxes)  # 2D boxes on a slice
    summary = summarize_interactive(cases)
    json.dumps(summary)  # ready for summary.json
    liver = [o for o in cases["a"] + cases["b"] if o["class"] == "liver"]
    assert summary["per_class"]["liver"]["n_objects"] == 4
    assert summary["per_class"]["liver"]["propagation_dice"] == pytest.approx(
        np.mean([o["propagation_dice"] for o in liver])
    )
    assert summary["per_class"]["spleen"]["noc90"] == pytest.approx(cases["a"][2]["noc90"])
    means = [summary["per_class"][n]["dice_at_k"] for n in ("liver", "spleen")]
    np.testing.assert_allclose(summary["foreground_mean"]["dice_at_k"], np.mean(means, axis=0))
    assert len(summary["mean"]["dice_at_k"]) == 10
    case_b = summary["per_case"]["b"]
    assert case_b["mean"]["n_objects"] == 3 and case_b["objects"][0]["class"] == "liver"
    assert case_b["mean"]["noc85"] == pytest.approx(np.mean([o["noc85"] for o in cases["b"]]))

    # evaluate_case_interactive finds the same objects itself
    per_case = evaluate_case_interactive(
        lambda p, prev: np.zeros(reference.shape), reference, {"background": 0, "liver": 1, "spleen": 2, "gone": 3},
        mode="component", max_clicks=3, dice_k=2, box=False,
    )  # fmt: skip
    assert [(o["class"], o["component"], o["n_voxels"]) for o in per_case] == [
        ("liver", 1, 700),
        ("liver", 2, 105),
        ("spleen", 1, 108),
    ]
    assert all(o["noc85"] == 3 and len(o["dice_at_k"]) == 2 for o in per_case)


def test_middle_slice_box_is_flat_on_the_objects_middle_slice():
    mask = np.zeros((10, 12, 9), dtype=bool)
    mask[2:6, 3:9, 2:7] = True
    mask[4, 4, 7] = True
    box = middle_slice_box(mask)
    assert box.tolist() == [2, 3, 4, 5, 8, 4]
    assert middle_slice_box(mask, axis=0).tolist() == [3, 3, 2, 3, 8, 6]  # slices 2-5: the lower middle, 3
    with pytest.raises(EvaluationError):
        middle_slice_box(np.zeros((4, 4, 4)))
