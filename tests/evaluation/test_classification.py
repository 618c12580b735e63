"""Classification metrics equal scikit-learn's on fixed predictions; subgroup gaps are found on a known example."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

from medseg.errors import ConfigError
from medseg.evaluation.classification.calibration import expected_calibration_error
from medseg.evaluation.classification.metrics import classification_metrics, subgroup_gaps, subgroup_metrics
from medseg.evaluation.classification.summary import build_classification_summary, write_classification_outputs


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture
def multiclass():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=60)
    logits = rng.normal(size=(60, 4)) + 1.5 * np.eye(4)[labels]
    return _softmax(logits), labels


def test_multiclass_metrics_equal_sklearn(multiclass):
    probs, labels = multiclass
    m = classification_metrics(probs, labels, "multiclass", ["a", "b", "c", "d"])
    pred = probs.argmax(1)
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert m["auroc_micro"] == pytest.approx(
        roc_auc_score(label_binarize(labels, classes=range(4)), probs, average="micro")
    )
    assert m["auroc"]["c"] == pytest.approx(roc_auc_score(labels == 2, probs[:, 2]))
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert m["f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(labels, pred))
    assert 0 < m["ece"] < 1 and m["n"] == 60


def test_ordinal_uses_quadratic_kappa_and_reports_mae(multiclass):
    probs, labels = multiclass
    m = classification_metrics(probs, labels, "ordinal")
    pred = probs.argmax(1)
    assert m["kappa"] == pytest.approx(cohen_kappa_score(labels, pred, weights="quadratic"))
    assert m["kappa"] != pytest.approx(cohen_kappa_score(labels, pred))
    assert m["mae"] == pytest.approx(np.abs(pred - labels).mean())


def test_binary_metrics_equal_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=50)
    p1 = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.2, size=50), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(probs, labels, "binary", ["neg", "pos"])
    pred = (p1 > 0.5).astype(int)
    assert m["auroc_macro"] == m["auroc_micro"] == pytest.approx(roc_auc_score(labels, p1))
    assert list(m["auroc"]) == ["pos"]
    assert m["f1"] == pytest.approx(f1_score(labels, pred))
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))


def test_multilabel_metrics_equal_sklearn():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=(40, 3))
    probs = np.clip(0.5 + 0.35 * (labels - 0.5) + rng.normal(0, 0.2, size=(40, 3)), 0, 1)
    m = classification_metrics(probs, labels, "multilabel", ["x", "y", "z"])
    pred = (probs >= 0.5).astype(int)
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(labels, probs, average="macro"))
    assert m["auroc_micro"] == pytest.approx(roc_auc_score(labels, probs, average="micro"))
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    kappas = [cohen_kappa_score(labels[:, j], pred[:, j]) for j in range(3)]
    assert m["kappa"] == pytest.approx(np.mean(kappas))


def test_auroc_of_a_class_absent_from_the_cases_is_null_not_nan(multiclass):
    probs, labels = multiclass
    keep = labels != 3
    m = classification_metrics(probs[keep], labels[keep], "multiclass")
    assert m["auroc"]["class_3"] is None
    assert m["auroc_macro"] == pytest.approx(np.mean([m["auroc"][f"class_{k}"] for k in range(3)]))


def test_ece_by_hand():
    # Top-label confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    # 10 bins: the 0.9 bin has accuracy 0.5 (|0.5 - 0.9| x half the cases), the 0.6 bin accuracy 1 (|1 - 0.6| x half).
    assert expected_calibration_error(probs, labels, "binary", num_bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    # 2 bins: one bin (0.5, 1] with mean confidence 0.75 and accuracy 0.75.
    assert expected_calibration_error(probs, labels, "binary", num_bins=2) == pytest.approx(0.0)


def test_wrong_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="binary probabilities must have 2 columns"):
        classification_metrics(np.full((3, 3), 1 / 3), [0, 1, 2], "binary")
    with pytest.raises(ConfigError, match="label kind"):
        classification_metrics(np.full((3, 2), 0.5), [0, 1, 1], "regression")


def test_subgroup_gap_on_a_constructed_example():
    # Site A: every prediction right; site B: half of them wrong. The accuracy gap is exactly 0.5, A best.
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    right = np.eye(2)[labels] * 0.8 + 0.1
    wrong = np.eye(2)[1 - labels] * 0.8 + 0.1
    probs = np.concatenate([right[:4], right[4:6], wrong[6:]])
    sites = ["A"] * 4 + ["B"] * 4
    groups = subgroup_metrics(probs, labels, {"site": sites, "sex": ["F", "M"] * 4}, "binary")
    assert groups["site"]["A"]["accuracy"] == 1.0 and groups["site"]["B"]["accuracy"] == 0.5
    gaps = subgroup_gaps(groups)
    assert gaps["site"]["accuracy"] == {
        "gap": 0.5, "best": "A", "worst": "B", "best_value": 1.0, "worst_value": 0.5,
    }  # fmt: skip
    assert gaps["site"]["ece"]["best"] == "A"  # lower is better for calibration error


def test_summary_layout_and_files(tmp_path, multiclass):
    probs, labels = multiclass
    names = ["a", "b", "c", "d"]
    ids = [f"case{i:02d}" for i in range(len(labels))]
    sites = np.where(np.arange(len(labels)) % 3 == 0, "X", "Y")
    summary = build_classification_summary(
        ids, probs, labels, "multiclass", names, subgroups={"site": list(sites)}, extras={"protocol": "linear"}
    )
    row = summary["metric_per_case"][5]
    assert row["case_id"] == "case05" and row["label"] == names[labels[5]]
    assert row["prediction"] == names[int(probs[5].argmax())]
    assert sum(row["probabilities"].values()) == pytest.approx(1.0)
    assert row["subgroups"] == {"site": sites[5]}
    assert summary["mean"]["accuracy"] == pytest.approx(np.mean([r["correct"] for r in summary["metric_per_case"]]))
    assert set(summary["subgroups"]["site"]) == {"X", "Y"} and "accuracy" in summary["subgroup_gaps"]["site"]
    files = write_classification_outputs(tmp_path, summary)
    assert json.loads(files["summary"].read_text())["protocol"] == "linear"
    lines = files["predictions"].read_text().splitlines()
    assert lines[0] == "case_id,a,b,c,d" and len(lines) == 61
    assert files["confusion_matrix"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
