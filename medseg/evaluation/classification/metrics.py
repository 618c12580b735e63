"""Classification metrics from predicted probabilities, overall and per subgroup, computed with scikit-learn.

Every metric is scikit-learn's (or torchmetrics' for calibration), called with the choices written here once, so a
number in ``summary.json`` can be reproduced with two lines of scikit-learn:

=====================  ===========================================================================================
metric                 definition
=====================  ===========================================================================================
``auroc``              per class: one-vs-rest ``roc_auc_score(y == k, p[:, k])``; ``None`` where the class is absent
                       (or present in every case) among the cases scored. Binary: the positive class only.
``auroc_macro``        mean of the defined per-class values (equals ``roc_auc_score(..., multi_class="ovr")`` when
                       every class occurs). Binary: the AUROC.
``auroc_micro``        ``roc_auc_score(one_hot(y).ravel(), p.ravel())``. Binary: the AUROC.
``accuracy``           ``accuracy_score`` of the arg-max (multi-label: all labels right, at ``threshold``).
``balanced_accuracy``  ``balanced_accuracy_score`` (multi-label: mean over labels).
``f1``                 binary: F1 of the positive class; otherwise the macro F1 over classes / labels.
``kappa``              ``cohen_kappa_score``; ``weights="quadratic"`` for ordinal labels (multi-label: label mean).
``mae``                ordinal only: mean absolute error in classes between arg-max and label.
``ece``                expected calibration error, see :mod:`~medseg.evaluation.classification.calibration`.
=====================  ===========================================================================================

Subgroups (sex, age band, site...) get the same metrics each, and :func:`subgroup_gaps` reports the largest
difference between two subgroups of a column per metric (best minus worst), the fairness gap of FairTune.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from medseg.data.classification import LABEL_KINDS
from medseg.errors import ConfigError
from medseg.evaluation.classification.calibration import expected_calibration_error

__all__ = [
    "GAP_METRICS",
    "case_scores",
    "check_probabilities",
    "classification_metrics",
    "predict_labels",
    "subgroup_gaps",
    "subgroup_metrics",
]

#: Metrics whose subgroup gap is reported (higher is better for all but ECE and MAE).
GAP_METRICS = ("auroc_macro", "accuracy", "balanced_accuracy", "f1", "kappa", "ece")


def _kind(kind: str) -> str:
    if kind not in LABEL_KINDS:
        raise ConfigError(f"label kind must be one of {LABEL_KINDS}, got {kind!r}.")
    return kind


def check_probabilities(probabilities: Any, labels: Any, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(N, K)`` float probabilities and labels (``(N,)`` indices, or ``(N, K)`` 0/1 for multi-label), checked."""
    kind = _kind(kind)
    probs = np.asarray(probabilities, dtype=np.float64)
    target = np.asarray(labels)
    if probs.ndim != 2 or len(probs) != len(target) or len(probs) == 0:
        raise ConfigError(
            f"probabilities must be (N, K) with one row per label, got {probs.shape} for labels {target.shape}."
        )
    if not np.all(np.isfinite(probs)) or probs.min() < -1e-6 or probs.max() > 1 + 1e-6:
        raise ConfigError("probabilities must be finite and in [0, 1]; apply softmax/sigmoid to the logits first.")
    if kind == "multilabel":
        if target.shape != probs.shape:
            raise ConfigError(f"multi-label targets must be (N, K) = {probs.shape}, got {target.shape}.")
        return probs, target.astype(np.int64)
    if kind == "binary" and probs.shape[1] != 2:
        raise ConfigError(f"binary probabilities must have 2 columns (negative, positive), got {probs.shape[1]}.")
    target = target.astype(np.int64).reshape(-1)
    if target.min() < 0 or target.max() >= probs.shape[1]:
        raise ConfigError(f"labels must be class indices in [0, {probs.shape[1] - 1}], got {np.unique(target)}.")
    return probs, target


def predict_labels(probabilities: np.ndarray, kind: str, threshold: float = 0.5) -> np.ndarray:
    """Arg-max class per case, or ``p >= threshold`` per label for multi-label."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if _kind(kind) == "multilabel":
        return (probs >= threshold).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)


def _auroc(target: np.ndarray, score: np.ndarray) -> float | None:
    if len(np.unique(target)) < 2:
        return None
    return float(roc_auc_score(target, score))


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def classification_metrics(
    probabilities: Any,
    labels: Any,
    kind: str,
    class_names: Sequence[str] | None = None,
    threshold: float = 0.5,
    num_bins: int = 15,
) -> dict[str, Any]:
    """All metrics of the module docstring for one set of cases.

    Args:
        probabilities: ``(N, K)``; softmax rows for binary/multiclass/ordinal, sigmoids for multilabel.
        labels: ``(N,)`` class indices, or ``(N, K)`` 0/1 for multilabel.
        kind: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``.
        class_names: names of the K columns (default ``class_0``...).
        threshold: multi-label decision threshold on each probability.
        num_bins: ECE bins.

    Returns:
        ``{"n", "auroc": {class: value | None}, "auroc_macro", "auroc_micro", "accuracy", "balanced_accuracy",
        "f1", "kappa", "ece"}`` (+ ``"mae"`` for ordinal); every value finite or ``None``.
    """
    probs, target = check_probabilities(probabilities, labels, kind)
    k = probs.shape[1]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(k)]
    if len(names) != k:
        raise ConfigError(f"{len(names)} class names for {k} probability columns.")
    pred = predict_labels(probs, kind, threshold)
    result: dict[str, Any] = {"n": len(target)}
    if kind == "multilabel":
        onehot = target
        per_label_kappa = [
            None if len(np.unique(np.r_[target[:, j], pred[:, j]])) < 2 else cohen_kappa_score(target[:, j], pred[:, j])
            for j in range(k)
        ]
        result.update(
            accuracy=float(accuracy_score(target, pred)),
            balanced_accuracy=_mean(
                [float(balanced_accuracy_score(target[:, j], pred[:, j])) for j in range(k) if target[:, j].any()]
            ),
            f1=float(f1_score(target, pred, average="macro", zero_division=0)),
            kappa=_mean([None if v is None or np.isnan(v) else float(v) for v in per_label_kappa]),
        )
    else:
        onehot = np.eye(k, dtype=np.int64)[target]
        weights = "quadratic" if kind == "ordinal" else None
        kappa = cohen_kappa_score(target, pred, weights=weights, labels=list(range(k)))
        result.update(
            accuracy=float(accuracy_score(target, pred)),
            balanced_accuracy=float(balanced_accuracy_score(target, pred)),
            f1=float(
                f1_score(target, pred, average="binary", zero_division=0)
                if kind == "binary"
                else f1_score(target, pred, average="macro", labels=sorted(set(target) | set(pred)), zero_division=0)
            ),
            kappa=None if np.isnan(kappa) else float(kappa),
        )
        if kind == "ordinal":
            result["mae"] = float(np.abs(pred - target).mean())
    if kind == "binary":
        value = _auroc(target, probs[:, 1])
        result.update(auroc={names[1]: value}, auroc_macro=value, auroc_micro=value)
    else:
        per_class = {names[j]: _auroc(onehot[:, j], probs[:, j]) for j in range(k)}
        result.update(
            auroc=per_class,
            auroc_macro=_mean(list(per_class.values())),
            auroc_micro=_auroc(onehot.ravel(), probs.ravel()),
        )
    result["ece"] = expected_calibration_error(probs, target, kind, num_bins)
    return result


def case_scores(probabilities: Any, labels: Any, kind: str, threshold: float = 0.5) -> list[dict[str, Any]]:
    """Per-case ``correct`` (0/1; multi-label: every label right), ``log_loss`` (nats) and ``brier`` score.

    These are means over cases of the summary's scores, so a benchmark can bootstrap them over cases; AUROC and
    kappa are not, and are recomputed from the per-case probabilities instead.
    """
    probs, target = check_probabilities(probabilities, labels, kind)
    pred = predict_labels(probs, kind, threshold)
    clipped = np.clip(probs, 1e-12, 1 - 1e-12)
    rows = []
    for i in range(len(probs)):
        if kind == "multilabel":
            correct = bool(np.all(pred[i] == target[i]))
            loss = -np.mean(target[i] * np.log(clipped[i]) + (1 - target[i]) * np.log(1 - clipped[i]))
            brier = np.mean((probs[i] - target[i]) ** 2)
        else:
            correct = bool(pred[i] == target[i])
            loss = -np.log(clipped[i, target[i]])
            brier = np.sum((probs[i] - np.eye(probs.shape[1])[target[i]]) ** 2)
        rows.append({"correct": int(correct), "log_loss": float(loss), "brier": float(brier)})
    return rows


def subgroup_metrics(
    probabilities: Any,
    labels: Any,
    groups: Mapping[str, Sequence[Any]],
    kind: str,
    class_names: Sequence[str] | None = None,
    min_cases: int = 1,
    **options: Any,
) -> dict[str, dict[str, dict[str, Any]]]:
    """:func:`classification_metrics` of the cases of each value of each subgroup column.

    Args:
        groups: ``{column: value per case}``, e.g. ``{"sex": ["F", "M", ...]}``; missing values (``None``, ``""``,
            NaN) are left out of that column's subgroups.
        min_cases: subgroups with fewer cases are skipped (their metrics would be noise).
        **options: passed to :func:`classification_metrics`.

    Returns:
        ``{column: {value: metrics}}`` with values as strings, in sorted order.
    """
    probs, target = check_probabilities(probabilities, labels, kind)
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for column, values in groups.items():
        values = list(values)
        if len(values) != len(probs):
            raise ConfigError(f"subgroup column {column!r} has {len(values)} values for {len(probs)} cases.")
        keys = np.array(["" if _missing(v) else str(v) for v in values], dtype=object)
        result[column] = {}
        for value in sorted(set(keys) - {""}):
            mask = keys == value
            if mask.sum() >= min_cases:
                result[column][value] = classification_metrics(probs[mask], target[mask], kind, class_names, **options)
    return result


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def subgroup_gaps(
    subgroups: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str] = GAP_METRICS
) -> dict[str, dict[str, dict[str, Any]]]:
    """Largest difference of each metric between two subgroups of each column.

    Returns:
        ``{column: {metric: {"gap", "best", "worst", "best_value", "worst_value"}}}``; ``gap >= 0`` is the
        absolute difference; ``best`` is the subgroup with the better value (lower for ``ece``/``mae``). Metrics
        defined in fewer than two subgroups are left out.
    """
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for column, by_value in subgroups.items():
        result[column] = {}
        for metric in metrics:
            values = {g: m.get(metric) for g, m in by_value.items() if m.get(metric) is not None}
            if len(values) < 2:
                continue
            lower_better = metric in {"ece", "mae"}
            ordered = sorted(values, key=lambda g: values[g], reverse=not lower_better)
            best, worst = ordered[0], ordered[-1]
            result[column][metric] = {
                "gap": float(abs(values[best] - values[worst])),
                "best": best,
                "worst": worst,
                "best_value": float(values[best]),
                "worst_value": float(values[worst]),
            }
    return result
