"""Scoring classifiers: metrics from predicted probabilities, calibration, and the run's ``summary.json``.

Segmentation scores masks on the native grid; a classifier is scored from one row of probabilities per case, so its
evaluation is a package of its own:

- :mod:`~.metrics`: AUROC, accuracy, balanced accuracy, F1, kappa, MAE (ordinal), overall and per subgroup, and the
  subgroup gaps (scikit-learn's definitions, written down once);
- :mod:`~.calibration`: expected calibration error (torchmetrics);
- :mod:`~.summary`: ``summary.json``, ``predictions.csv`` and ``confusion_matrix.png`` of a classification run.

The label kinds themselves (:data:`medseg.data.classification.LABEL_KINDS`) belong to the data that defines them.
Nothing is imported here: import from the module that holds the piece.
"""

from __future__ import annotations

__all__: list[str] = []
