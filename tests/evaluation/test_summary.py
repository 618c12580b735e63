"""summary.json: means under the empty-label policy, strict JSON, completeness checks, folder evaluation."""

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
    read_summary,
    write_summary,
)

LABELS = {"background": 0, "liver": 1, "tumour": 2}


def case(case_id, liver, tumour):
    return {
        "case_id": case_id,
        "prediction_file": f"/p/{case_id}.nii.gz",
        "metrics": {"liver": liver, "tumour": tumour},
    }


def scores(dice, hd95, nsd, n_ref=10, n_pred=10):
    return {"dice": dice, "hd95": hd95, "nsd": nsd, "n_ref": n_ref, "n_pred": n_pred}


@pytest.fixture
def summary():
    per_case = [
        case("a", scores(0.9, 2.0, 0.8), scores(0.5, 6.0, 0.4)),
        case("b", scores(0.7, 4.0, 0.6), scores(0.0, None, 0.0, n_ref=0, n_pred=3)),  # tumour predicted, absent
        case("c", scores(0.8, 3.0, 0.7), scores(1.0, 0.0, 1.0, n_ref=0, n_pred=0)),  # tumour absent, none predicted
    ]
    return build_summary(per_case, LABELS, {"trainable_params": 1234, "wall_time_s": 5.5})


def test_means_follow_the_policy(summary):
    assert summary["n_cases"] == 3
    assert summary["mean"]["liver"]["dice"] == pytest.approx(0.8)
    # Dice and NSD average every case (policy values included); HD95 leaves out the undefined one and says so.
    assert summary["mean"]["tumour"]["dice"] == pytest.approx(0.5)
    assert summary["mean"]["tumour"]["nsd"] == pytest.approx(1.4 / 3)
    assert summary["mean"]["tumour"]["hd95"] == pytest.approx(3.0)
    assert summary["mean"]["tumour"]["hd95_n"] == 2
    assert summary["mean"]["tumour"]["n_pred"] == pytest.approx(13 / 3)
    assert "background" not in summary["mean"]


def test_foreground_mean_is_mean_over_foreground_classes(summary):
    for metric in ("dice", "hd95", "nsd"):
        expected = np.mean([summary["mean"]["liver"][metric], summary["mean"]["tumour"][metric]])
        assert summary["foreground_mean"][metric] == pytest.approx(expected)


def test_extras_and_policy_are_stored(summary):
    assert summary["trainable_params"] == 1234 and summary["wall_time_s"] == 5.5
    assert summary["empty_label_policy"] == EMPTY_LABEL_POLICY
    with pytest.raises(EvaluationError, match="reserved"):
        build_summary(summary["metric_per_case"], LABELS, {"mean": 1})


def test_hd95_mean_is_null_when_never_defined():
    per_case = [case("a", scores(0.9, 2.0, 0.8), scores(0.0, None, 0.0, n_ref=4, n_pred=0))]
    built = build_summary(per_case, LABELS)
    assert built["mean"]["tumour"]["hd95"] is None and built["mean"]["tumour"]["hd95_n"] == 0
    assert built["foreground_mean"]["hd95"] == pytest.approx(2.0)  # skips the null class mean


def test_nan_and_missing_classes_are_refused():
    with pytest.raises(EvaluationError, match="finite"):
        build_summary([case("a", scores(float("nan"), 1.0, 1.0), scores(1.0, 0.0, 1.0))], LABELS)
    with pytest.raises(EvaluationError, match="tumour"):
        build_summary([{"case_id": "a", "metrics": {"liver": scores(1.0, 0.0, 1.0)}}], LABELS)
    with pytest.raises(EvaluationError, match="no cases"):
        build_summary([], LABELS)


def test_write_read_round_trip_and_strict_json(summary, tmp_path):
    path = write_summary(tmp_path / "run" / "summary.json", summary)
    text = path.read_text()
    assert "NaN" not in text and text.startswith("{\n")
    assert read_summary(path) == json.loads(text) == summary
    assert is_complete(path) and is_complete(path, expected_cases=3)
    assert not is_complete(path, expected_cases=4)


def test_is_complete_false_for_partial_files(summary, tmp_path):
    path = write_summary(tmp_path / "summary.json", summary)
    text = path.read_text()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    assert not is_complete(truncated)
    assert not is_complete(tmp_path / "missing.json")
    short = dict(summary, metric_per_case=summary["metric_per_case"][:2])  # n_cases says 3
    assert not is_complete(write_summary(tmp_path / "short.json", short))
    lacking = json.loads(text)
    del lacking["metric_per_case"][0]["metrics"]["tumour"]["nsd"]
    assert not is_complete(write_summary(tmp_path / "lacking.json", lacking))
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
    assert summary["mean"]["organ"]["dice"] == pytest.approx(0.5)
    assert summary["mean"]["organ"]["hd95"] == pytest.approx(6.0)  # 3 voxels x 2 mm, spacing from the affine
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
