"""summary.json: nnU-Net's view beside medseg's, means under each one's empty-label policy, strict JSON, completeness
checks (older layouts included), folder evaluation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medseg.evaluation import (
    EMPTY_LABEL_POLICY,
    EvaluationError,
    build_summary,
    evaluate_folder,
    is_complete,
    medseg_metrics,
    read_summary,
    write_summary,
)

LABELS = {"background": 0, "liver": 1, "tumour": 2}


def counts(tp, fp, fn, tn):
    """nnU-Net's metrics of one label from its voxel counts (Dice and IoU undefined when both masks are empty)."""
    defined = tp + fp + fn > 0
    return {
        "Dice": 2 * tp / (2 * tp + fp + fn) if defined else None, "IoU": tp / (tp + fp + fn) if defined else None,
        "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": tp + fp, "n_ref": tp + fn,
    }  # fmt: skip


def case(case_id, liver, tumour, liver_counts=(9, 1, 1, 89), tumour_counts=(5, 5, 5, 85)):
    files = {"prediction_file": f"/p/{case_id}.nii.gz", "reference_file": f"/r/{case_id}.nii.gz"}
    nnunet = {"metrics": {"1": counts(*liver_counts), "2": counts(*tumour_counts)}, **files}
    return {"case_id": case_id, **files, "metrics": {"liver": liver, "tumour": tumour}, "nnunet": nnunet}


def scores(dice, hd95, nsd, n_ref=10, n_pred=10):
    return {"dice": dice, "hd95": hd95, "nsd": nsd, "n_ref": n_ref, "n_pred": n_pred}


@pytest.fixture
def summary():
    per_case = [
        case("a", scores(0.9, 2.0, 0.8), scores(0.5, 6.0, 0.4)),
        # tumour predicted, absent: Dice 0 in both views
        case("b", scores(0.7, 4.0, 0.6), scores(0.0, None, 0.0, n_ref=0, n_pred=3), (7, 3, 3, 87), (0, 3, 0, 97)),
        # tumour absent, none predicted: medseg scores 1, nnU-Net leaves the Dice undefined
        case("c", scores(0.8, 3.0, 0.7), scores(1.0, 0.0, 1.0, n_ref=0, n_pred=0), (8, 2, 2, 88), (0, 0, 0, 100)),
    ]
    return build_summary(per_case, LABELS, {"trainable_params": 1234, "wall_time_s": 5.5})


def test_means_follow_the_policy(summary):
    view = medseg_metrics(summary)
    assert summary["n_cases"] == 3 and view is summary["medseg"]
    assert view["mean"]["liver"]["dice"] == pytest.approx(0.8)
    # Dice and NSD average every case (policy values included); HD95 leaves out the undefined one and says so.
    assert view["mean"]["tumour"]["dice"] == pytest.approx(0.5)
    assert view["mean"]["tumour"]["nsd"] == pytest.approx(1.4 / 3)
    assert view["mean"]["tumour"]["hd95"] == pytest.approx(3.0)
    assert view["mean"]["tumour"]["hd95_n"] == 2
    assert view["mean"]["tumour"]["n_pred"] == pytest.approx(13 / 3)
    assert "background" not in view["mean"]
    assert [c["case_id"] for c in view["metric_per_case"]] == ["a", "b", "c"]
    assert all("nnunet" not in c for c in view["metric_per_case"])  # nnU-Net's counts live in its own view


def test_foreground_mean_is_mean_over_foreground_classes(summary):
    view = medseg_metrics(summary)
    for metric in ("dice", "hd95", "nsd"):
        expected = np.mean([view["mean"]["liver"][metric], view["mean"]["tumour"][metric]])
        assert view["foreground_mean"][metric] == pytest.approx(expected)
        assert summary["foreground_mean"][metric] == view["foreground_mean"][metric]  # readable at the top level too


def test_the_top_level_is_nnunets_view(summary):
    cases = summary["metric_per_case"]
    assert all(set(c) == {"metrics", "prediction_file", "reference_file"} for c in cases)
    assert all(list(c["metrics"]) == ["1", "2"] for c in cases)  # label values as strings, as nnU-Net keys them
    assert [c["metrics"]["2"]["Dice"] for c in cases] == [0.5, 0.0, None]
    assert list(summary["mean"]) == ["1", "2"]
    assert summary["mean"]["1"]["Dice"] == pytest.approx(0.8) and summary["mean"]["1"]["TP"] == pytest.approx(8.0)
    assert summary["mean"]["2"]["Dice"] == pytest.approx(0.25)  # np.nanmean: the undefined case is left out
    assert summary["mean"]["2"]["IoU"] == pytest.approx(1 / 6)
    assert summary["mean"]["2"]["n_pred"] == pytest.approx(13 / 3)
    fg = summary["foreground_mean"]
    assert fg["Dice"] == pytest.approx(np.mean([0.8, 0.25])) and fg["TN"] == pytest.approx(np.mean([88, 94]))


def test_nnunets_foreground_dice_is_null_when_a_label_never_has_one():
    per_case = [case("a", scores(0.9, 2.0, 0.8), scores(1.0, 0.0, 1.0, n_ref=0, n_pred=0), tumour_counts=(0, 0, 0, 9))]
    built = build_summary(per_case, LABELS)
    assert built["mean"]["2"]["Dice"] is None and built["mean"]["2"]["TN"] == 9.0
    assert built["foreground_mean"]["Dice"] is None and built["foreground_mean"]["TN"] == pytest.approx(49.0)
    assert built["foreground_mean"]["dice"] == pytest.approx(0.95)  # medseg's policy scores the absent tumour as 1


def test_extras_and_policy_are_stored(summary):
    assert summary["trainable_params"] == 1234 and summary["wall_time_s"] == 5.5
    assert summary["empty_label_policy"] == EMPTY_LABEL_POLICY
    assert summary["labels"] == LABELS
    for key in ("mean", "medseg"):
        with pytest.raises(EvaluationError, match="reserved"):
            build_summary([case("a", scores(1.0, 0.0, 1.0), scores(1.0, 0.0, 1.0))], LABELS, {key: 1})


def test_hd95_mean_is_null_when_never_defined():
    per_case = [case("a", scores(0.9, 2.0, 0.8), scores(0.0, None, 0.0, n_ref=4, n_pred=0))]
    view = medseg_metrics(build_summary(per_case, LABELS))
    assert view["mean"]["tumour"]["hd95"] is None and view["mean"]["tumour"]["hd95_n"] == 0
    assert view["foreground_mean"]["hd95"] == pytest.approx(2.0)  # skips the null class mean


def test_nan_missing_classes_and_missing_nnunet_counts_are_refused():
    with pytest.raises(EvaluationError, match="finite"):
        build_summary([case("a", scores(float("nan"), 1.0, 1.0), scores(1.0, 0.0, 1.0))], LABELS)
    with pytest.raises(EvaluationError, match="tumour"):
        build_summary([{"case_id": "a", "metrics": {"liver": scores(1.0, 0.0, 1.0)}}], LABELS)
    without = case("a", scores(1.0, 0.0, 1.0), scores(1.0, 0.0, 1.0))
    del without["nnunet"]
    with pytest.raises(EvaluationError, match="no nnU-Net entry for labels \\['1', '2'\\].*score_case"):
        build_summary([without], LABELS)
    other_labels = case("a", scores(1.0, 0.0, 1.0), scores(1.0, 0.0, 1.0))
    del other_labels["nnunet"]["metrics"]["2"]
    with pytest.raises(EvaluationError, match="nnU-Net entry"):
        build_summary([other_labels], LABELS)
    with pytest.raises(EvaluationError, match="no cases"):
        build_summary([], LABELS)


def test_write_read_round_trip_and_strict_json(summary, tmp_path):
    path = write_summary(tmp_path / "run" / "summary.json", summary)
    text = path.read_text()
    assert "NaN" not in text and text.startswith("{\n")
    assert read_summary(path) == json.loads(text) == summary
    assert is_complete(path) and is_complete(path, expected_cases=3)
    assert not is_complete(path, expected_cases=4)


def test_summaries_in_the_layout_before_nnunets_view_stay_readable(summary, tmp_path):
    view = medseg_metrics(summary)
    older = {key: value for key, value in summary.items() if key != "medseg"}
    older.update(metric_per_case=view["metric_per_case"], mean=view["mean"], foreground_mean=view["foreground_mean"])
    path = write_summary(tmp_path / "older.json", older)
    assert is_complete(path, expected_cases=3)
    assert medseg_metrics(read_summary(path)) == view
    nnunet_only = {key: summary[key] for key in ("metric_per_case", "mean")}  # e.g. nnUNetv2_evaluate_folder's file
    nnunet_only["foreground_mean"] = {k: v for k, v in summary["foreground_mean"].items() if k[0].isupper()}
    with pytest.raises(EvaluationError, match="no 'medseg' section"):
        medseg_metrics(nnunet_only)
    assert not is_complete(write_summary(tmp_path / "nnunet.json", {**nnunet_only, "n_cases": 3}))


def test_is_complete_false_for_partial_files(summary, tmp_path):
    path = write_summary(tmp_path / "summary.json", summary)
    text = path.read_text()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    assert not is_complete(truncated)
    assert not is_complete(tmp_path / "missing.json")
    for view in ("medseg", "nnunet"):  # n_cases says 3
        short = json.loads(text)
        cases = short["medseg"] if view == "medseg" else short
        cases["metric_per_case"] = cases["metric_per_case"][:2]
        assert not is_complete(write_summary(tmp_path / f"short_{view}.json", short))
    lacking = json.loads(text)
    del lacking["medseg"]["metric_per_case"][0]["metrics"]["tumour"]["nsd"]
    assert not is_complete(write_summary(tmp_path / "lacking.json", lacking))
    lacking = json.loads(text)
    del lacking["metric_per_case"][1]["metrics"]["2"]["TN"]
    assert not is_complete(write_summary(tmp_path / "lacking_nnunet.json", lacking))
    with pytest.raises(EvaluationError, match="not valid JSON"):
        read_summary(truncated)


def write(path, data, affine):
    image = nib.Nifti1Image(data.astype(np.uint8), affine)
    nib.save(image, path)


def test_evaluate_folder(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir(), ref_dir.mkdir()
    affine = np.diag([2.0, 0.5, 1.25, 1.0])
    reference = np.zeros((14, 14, 14), dtype=np.uint8)
    reference[2:8, 2:8, 2:8] = 1
    write(ref_dir / "c1.nii.gz", reference, affine)
    write(pred_dir / "c1.nii.gz", np.roll(reference, 3, axis=0), affine)
    write(ref_dir / "c2.nii.gz", reference, affine)  # a reference without prediction is not evaluated
    summary = evaluate_folder(pred_dir, ref_dir, {"background": 0, "organ": 1}, output=tmp_path / "summary.json")
    assert summary["n_cases"] == 1
    view = medseg_metrics(summary)
    assert view["mean"]["organ"]["dice"] == pytest.approx(0.5)
    assert view["mean"]["organ"]["hd95"] == pytest.approx(6.0)  # 3 voxels x 2 mm, spacing from the affine
    assert summary["metric_per_case"][0]["metrics"]["1"] == {
        "Dice": 0.5, "IoU": 1 / 3, "FP": 108, "TP": 108, "FN": 108, "TN": 14**3 - 324, "n_pred": 216, "n_ref": 216,
    }  # fmt: skip
    assert summary["metric_per_case"][0]["prediction_file"] == str(pred_dir / "c1.nii.gz")
    assert is_complete(tmp_path / "summary.json")


def test_evaluate_folder_names_the_mismatching_file(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir(), ref_dir.mkdir()
    data = np.zeros((6, 6, 6), dtype=np.uint8)
    write(ref_dir / "c1.nii.gz", data, np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    write(pred_dir / "c1.nii.gz", data, shifted)
    with pytest.raises(EvaluationError, match=r"pred/c1\.nii\.gz has a different affine"):
        evaluate_folder(pred_dir, ref_dir, {"background": 0, "organ": 1})
    write(pred_dir / "c1.nii.gz", data[:5], np.eye(4))
    with pytest.raises(EvaluationError, match=r"c1\.nii\.gz has shape"):
        evaluate_folder(pred_dir, ref_dir, {"background": 0, "organ": 1})
    write(pred_dir / "c9.nii.gz", data, np.eye(4))
    with pytest.raises(EvaluationError, match="c9"):
        evaluate_folder(pred_dir, ref_dir, {"background": 0, "organ": 1})
