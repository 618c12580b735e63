"""Evaluation on full volumes in native geometry: per-case metrics, their empty-label policy, and ``summary.json``
(nnU-Net's view at its top level, medseg's under ``medseg``, read with :func:`medseg_metrics`)."""

from __future__ import annotations

from medseg.evaluation.metrics import (
    EMPTY_LABEL_POLICY,
    METRICS,
    EvaluationError,
    case_metrics,
    foreground_classes,
    spacing_from_affine,
)
from medseg.evaluation.summary import (
    build_summary,
    evaluate_folder,
    is_complete,
    medseg_metrics,
    read_summary,
    score_case,
    write_summary,
)

__all__ = [
    "EMPTY_LABEL_POLICY",
    "METRICS",
    "EvaluationError",
    "build_summary",
    "case_metrics",
    "evaluate_folder",
    "foreground_classes",
    "is_complete",
    "medseg_metrics",
    "read_summary",
    "score_case",
    "spacing_from_affine",
    "write_summary",
]
