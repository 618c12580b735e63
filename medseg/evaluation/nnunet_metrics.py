"""nnU-Net's own per-case metrics and means, computed as nnunetv2's ``evaluation/evaluate_predictions.py`` does.

``summary.json`` carries nnU-Net's sections at its top level so that ``nnunetv2``'s ``load_summary_json`` reads it and
anyone comparing with an nnU-Net run sees the same numbers under the same keys (:mod:`medseg.evaluation.summary`).
This module is that computation, written out rather than imported because ``nnunetv2`` is an optional extra;
``tests/evaluation/test_nnunet_summary.py`` checks it against ``nnunetv2`` itself.

nnU-Net's conventions, which differ from medseg's (:data:`medseg.evaluation.EMPTY_LABEL_POLICY`):

- the keys are label values (``"1"``), or region tuples (``"(1, 2, 3)"``) when ``dataset.json`` declares a region of
  more than one label, as ``label_or_region_to_key`` writes them; without regions every label value present in
  ``labels`` is scored once, whatever its name;
- ``Dice`` and ``IoU`` are undefined when reference and prediction are both empty (nnU-Net writes NaN; this strict
  JSON writes ``null``), and ``mean`` skips them (``np.nanmean``); ``foreground_mean`` averages the per-label means
  (``np.mean``), so one label with no defined Dice in any case makes its ``Dice`` ``null``;
- voxels that the reference marks with the ``ignore`` label are left out of every count.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medseg.evaluation.metrics import EvaluationError

__all__ = ["NNUNET_METRICS", "nnunet_case", "nnunet_means", "nnunet_regions"]

# The metric names of one label in nnU-Net's metric_per_case, in compute_metrics' order.
NNUNET_METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")

Region = int | tuple[int, ...]


def _is_region(value: Any) -> bool:
    return isinstance(value, Sequence | np.ndarray) and not isinstance(value, str)


def nnunet_regions(labels: Mapping[str, int | Sequence[int]]) -> list[Region]:
    """The labels or regions nnU-Net evaluates for a ``dataset.json`` ``labels`` map (``LabelManager``'s rules).

    With a region of more than one label anywhere, every non-background entry is one region (a list becomes a tuple,
    a number stays a number), in ``labels``' order; otherwise every distinct label value except 0, sorted. The
    ``ignore`` entry is never evaluated.
    """
    entries = [(str(name), value) for name, value in labels.items() if str(name) != "ignore"]
    if any(_is_region(value) and len(value) > 1 for _, value in entries):
        regions: list[Region] = []
        for _, value in entries:
            region: Region = tuple(int(v) for v in value) if _is_region(value) else int(value)
            if region != 0 and not (isinstance(region, tuple) and set(region) == {0}):
                regions.append(region)
        return regions
    values = {int(v) for _, value in entries for v in (value if _is_region(value) else (value,))}
    return sorted(v for v in values if v != 0)


def nnunet_case(
    prediction: np.ndarray,
    reference: np.ndarray,
    labels: Mapping[str, int | Sequence[int]],
    prediction_file: str,
    reference_file: str,
) -> dict[str, Any]:
    """One entry of nnU-Net's ``metric_per_case``: TP/FP/FN/TN per label or region, with Dice and IoU from them.

    Returns:
        ``{"metrics": {key: {"Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref"}}, "prediction_file",
        "reference_file"}``, keyed as nnU-Net keys it (``str`` of the label or region tuple); ``Dice``/``IoU`` are
        ``None`` where both masks are empty.
    """
    if prediction.shape != reference.shape:
        raise EvaluationError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}.")
    ignore = labels.get("ignore")
    used = reference != int(ignore) if ignore is not None else np.ones(reference.shape, dtype=bool)
    metrics: dict[str, dict[str, float | int | None]] = {}
    for region in nnunet_regions(labels):
        values = region if isinstance(region, tuple) else (region,)
        ref, pred = np.isin(reference, values), np.isin(prediction, values)
        tp, fp = int(np.sum(ref & pred & used)), int(np.sum(~ref & pred & used))
        fn, tn = int(np.sum(ref & ~pred & used)), int(np.sum(~ref & ~pred & used))
        defined = tp + fp + fn > 0
        metrics[str(region)] = {
            "Dice": 2 * tp / (2 * tp + fp + fn) if defined else None,
            "IoU": tp / (tp + fp + fn) if defined else None,
            "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp,
        }  # fmt: skip
    return {"metrics": metrics, "prediction_file": str(prediction_file), "reference_file": str(reference_file)}


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def nnunet_means(cases: Sequence[Mapping[str, Any]]) -> tuple[dict[str, dict[str, float | None]], dict]:
    """nnU-Net's ``mean`` (per key, ``np.nanmean`` over cases) and ``foreground_mean`` (``np.mean`` over keys but 0).

    Raises:
        EvaluationError: no cases, or cases scored on different labels (every case must have the same keys).
    """
    if not cases:
        raise EvaluationError("no cases to summarise; check that the prediction folder is not empty.")
    keys = list(cases[0]["metrics"])
    for case in cases:
        if list(case["metrics"]) != keys:
            raise EvaluationError(
                f"{case.get('prediction_file')} is scored on labels {list(case['metrics'])}, the first case on {keys};"
                f" score every case with the same dataset.json labels."
            )
    nan = float("nan")
    mean: dict[str, dict[str, float | None]] = {}
    with warnings.catch_warnings():  # a label with no defined Dice in any case: its mean is null, as nnU-Net's NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        for key in keys:
            column = {m: [case["metrics"][key][m] for case in cases] for m in NNUNET_METRICS}
            mean[key] = {
                m: _number(np.nanmean(np.array([nan if v is None else v for v in column[m]], dtype=np.float64)))
                for m in NNUNET_METRICS
            }
        foreground = {
            m: _number(np.mean([nan if mean[k][m] is None else mean[k][m] for k in keys if k != "0"]))
            for m in NNUNET_METRICS
        }
    return mean, foreground
