"""Expected calibration error: does a predicted probability of 0.8 come true 80 % of the time?

A classifier can rank cases well (high AUROC) and still be over-confident, which matters when a probability is read
as a risk. ECE bins the predictions by confidence into ``num_bins`` equal-width bins on [0, 1] and averages
``|accuracy - confidence|`` over the bins, weighted by the fraction of predictions in each (Guo et al., ICML 2017).
It is computed with torchmetrics, so its binning conventions are the library's, not ours:

* ``binary``, ``multiclass``, ``ordinal``: top-label ECE (confidence = the largest class probability, correct = the
  arg-max is the label), torchmetrics ``multiclass_calibration_error``;
* ``multilabel``: every (case, label) pair is a binary prediction, torchmetrics ``binary_calibration_error``.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from medseg.errors import ConfigError

__all__ = ["expected_calibration_error"]


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, kind: str = "multiclass", num_bins: int = 15
) -> float:
    """ECE in [0, 1] (0: calibrated) of ``probabilities`` against ``labels``.

    Args:
        probabilities: ``(N, K)`` class probabilities (rows summing to 1), or per-label probabilities for
            ``multilabel``.
        labels: ``(N,)`` class indices, or ``(N, K)`` 0/1 for ``multilabel``.
        kind: ``binary``, ``multiclass``, ``ordinal`` or ``multilabel``.
        num_bins: equal-width confidence bins on [0, 1].
    """
    probs = torch.as_tensor(np.asarray(probabilities, dtype=np.float64))
    target = torch.as_tensor(np.asarray(labels)).long()
    if num_bins < 1:
        raise ConfigError(f"ECE num_bins must be positive, got {num_bins}.")
    if kind == "multilabel":
        return float(binary_calibration_error(probs.reshape(-1), target.reshape(-1), n_bins=num_bins, norm="l1"))
    if kind not in {"binary", "multiclass", "ordinal"}:
        raise ConfigError(f"label kind must be binary, multiclass, ordinal or multilabel, got {kind!r}.")
    return float(multiclass_calibration_error(probs, target, num_classes=probs.shape[1], n_bins=num_bins, norm="l1"))
