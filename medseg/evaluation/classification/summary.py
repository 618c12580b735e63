"""``summary.json`` of a classification run, its per-case CSV of probabilities, and the confusion-matrix plot.

The layout follows the segmentation summary's conventions (:mod:`medseg.evaluation.summary`) so the benchmark runner
reads both: ``metric_per_case`` holds one row per case (``case_id``, ``label``, ``probabilities`` by class name,
``prediction``, ``correct``, ``log_loss``, ``brier``, ``subgroups``), from which any metric can be bootstrapped over
cases; ``mean`` holds the metrics over all cases (:func:`~.metrics.classification_metrics`); ``subgroups`` and
``subgroup_gaps`` are present when the dataset has subgroup columns; ``task`` is ``"classification"``. Every number
is finite or ``null``, and files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, multilabel_confusion_matrix

from medseg.atomic import atomic_path, atomic_write_text
from medseg.errors import ConfigError
from medseg.evaluation.classification.metrics import (
    case_scores,
    check_probabilities,
    classification_metrics,
    predict_labels,
    subgroup_gaps,
    subgroup_metrics,
)
from medseg.evaluation.summary import write_summary

__all__ = [
    "build_classification_summary",
    "plot_confusion_matrix",
    "write_classification_outputs",
    "write_probabilities_csv",
]

_RESERVED = ("metric_per_case", "mean", "n_cases", "labels", "label_kind", "task", "subgroups", "subgroup_gaps")


def _label_value(label: np.ndarray, kind: str, names: Sequence[str]) -> Any:
    if kind == "multilabel":
        return [names[j] for j in np.flatnonzero(label)]
    return names[int(label)]


def build_classification_summary(
    case_ids: Sequence[str],
    probabilities: Any,
    labels: Any,
    kind: str,
    class_names: Sequence[str],
    subgroups: Mapping[str, Sequence[Any]] | None = None,
    extras: Mapping[str, Any] | None = None,
    min_subgroup_cases: int = 2,
    **options: Any,
) -> dict[str, Any]:
    """The ``summary.json`` dictionary (see the module docstring) of one run's test cases.

    Args:
        case_ids: one id per row of ``probabilities``.
        probabilities: ``(N, K)`` class (or label) probabilities.
        labels: ``(N,)`` class indices, or ``(N, K)`` 0/1 for multi-label.
        kind: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``.
        class_names: names of the K columns.
        subgroups: ``{column: value per case}``; empty or ``None`` when the dataset has none.
        extras: run facts (protocol, parameter counts, times), not one of the reserved keys.
        min_subgroup_cases: subgroups with fewer test cases are not scored.
        **options: ``threshold``, ``num_bins`` of :func:`classification_metrics`.
    """
    probs, target = check_probabilities(probabilities, labels, kind)
    if len(case_ids) != len(probs):
        raise ConfigError(f"{len(case_ids)} case ids for {len(probs)} rows of probabilities.")
    extras = dict(extras or {})
    clash = sorted(set(extras) & set(_RESERVED))
    if clash:
        raise ConfigError(f"extras may not use the reserved summary keys {clash}.")
    names = list(class_names)
    preds = predict_labels(probs, kind, options.get("threshold", 0.5))
    scores = case_scores(probs, target, kind, options.get("threshold", 0.5))
    groups = {k: list(v) for k, v in (subgroups or {}).items()}
    rows = []
    for i, case_id in enumerate(case_ids):
        rows.append(
            {
                "case_id": str(case_id),
                "label": _label_value(target[i], kind, names),
                "probabilities": {n: float(p) for n, p in zip(names, probs[i])},
                "prediction": _label_value(preds[i], kind, names),
                **scores[i],
                "subgroups": {c: (None if v[i] is None else str(v[i])) for c, v in groups.items()},
            }
        )
    summary: dict[str, Any] = {
        "task": "classification",
        "label_kind": kind,
        "labels": names,
        "metric_per_case": rows,
        "mean": {
            **classification_metrics(probs, target, kind, names, **options),
            **{m: float(np.mean([s[m] for s in scores])) for m in ("log_loss", "brier")},
        },
        "n_cases": len(rows),
    }
    if groups:
        by_group = subgroup_metrics(probs, target, groups, kind, names, min_cases=min_subgroup_cases, **options)
        summary["subgroups"] = by_group
        summary["subgroup_gaps"] = subgroup_gaps(by_group)
    summary.update(extras)
    json.dumps(summary, allow_nan=False)
    return summary


def write_probabilities_csv(
    path: str | os.PathLike[str], case_ids: Sequence[str], probabilities: Any, class_names
) -> Path:
    """``case_id,<class>...`` with one row of probabilities per case (what ``medseg predict`` writes too)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case_id", *class_names])
    for case_id, row in zip(case_ids, np.asarray(probabilities, dtype=np.float64)):
        writer.writerow([case_id, *(f"{p:.6f}" for p in row)])
    return atomic_write_text(path, buffer.getvalue())


def plot_confusion_matrix(
    path: str | os.PathLike[str], labels: Any, predictions: Any, kind: str, class_names: Sequence[str]
) -> Path:
    """Save the confusion matrix as a PNG (counts, rows = reference); multi-label: one 2 x 2 panel per label."""
    import matplotlib  # lazy: pyplot's backend is chosen (Agg) only when a plot is drawn, never at import

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # lazy: see above, after matplotlib.use

    names = list(class_names)
    if kind == "multilabel":
        matrices = multilabel_confusion_matrix(np.asarray(labels), np.asarray(predictions))
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
        for ax, matrix, name in zip(axes[0], matrices, names):
            ConfusionMatrixDisplay(matrix, display_labels=["no", "yes"]).plot(ax=ax, colorbar=False)
            ax.set_title(name)
    else:
        matrix = confusion_matrix(np.asarray(labels), np.asarray(predictions), labels=list(range(len(names))))
        side = max(3.5, 0.9 * len(names) + 2)
        fig, ax = plt.subplots(figsize=(side, side))
        ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=ax, colorbar=False, xticks_rotation=45)
        ax.set_title("Confusion matrix (rows: reference)")
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def write_classification_outputs(run_dir: str | os.PathLike[str], summary: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``summary.json``, ``predictions.csv`` and ``confusion_matrix.png`` of a summary into ``run_dir``."""
    run_dir = Path(run_dir)
    kind, names = summary["label_kind"], list(summary["labels"])
    rows = summary["metric_per_case"]
    ids = [r["case_id"] for r in rows]
    probs = np.array([[r["probabilities"][n] for n in names] for r in rows])

    def index(value: Any) -> Any:
        if kind == "multilabel":
            return [int(n in value) for n in names]
        return names.index(value)

    labels = np.array([index(r["label"]) for r in rows])
    preds = np.array([index(r["prediction"]) for r in rows])
    return {
        "summary": write_summary(run_dir / "summary.json", summary),
        "predictions": write_probabilities_csv(run_dir / "predictions.csv", ids, probs, names),
        "confusion_matrix": plot_confusion_matrix(run_dir / "confusion_matrix.png", labels, preds, kind, names),
    }
