"""Scoring classifiers: metrics from predicted probabilities, calibration, and the run's ``summary.json``.

Segmentation scores masks on the native grid; a classifier is scored from one row of probabilities per case, so its
evaluation is a package of its own:

- :mod:`~.metrics`: AUROC, accuracy, balanced accuracy, F1, kappa, MAE (ordinal), overall and per subgroup, and the
  subgroup gaps (scikit-learn's definitions, written down once);
- :mod:`~.calibration`: expected calibration error (torchmetrics);
- :mod:`~.summary`: ``summary.json``, ``predictions.csv`` and ``confusion_matrix.png`` of a classification run.

The label kinds themselves (:data:`medseg.data.classification.LABEL_KINDS`) belong to the data that defines them.
"""

from __future__ import annotations

from medseg.evaluation.classification.calibration import expected_calibration_error
from medseg.evaluation.classification.metrics import (
    GAP_METRICS,
    case_scores,
    check_probabilities,
    classification_metrics,
    predict_labels,
    subgroup_gaps,
    subgroup_metrics,
)
from medseg.evaluation.classification.summary import (
    build_classification_summary,
    plot_confusion_matrix,
    write_classification_outputs,
    write_probabilities_csv,
)

__all__ = [
    "GAP_METRICS",
    "build_classification_summary",
    "case_scores",
    "check_probabilities",
    "classification_metrics",
    "expected_calibration_error",
    "plot_confusion_matrix",
    "predict_labels",
    "subgroup_gaps",
    "subgroup_metrics",
    "write_classification_outputs",
    "write_probabilities_csv",
]
