"""``summary.json``: the per-case metrics of one run, their per-class means and the foreground mean, in two views.

**nnU-Net's view** is the top level, keyed and named exactly as nnunetv2's ``evaluate_predictions.py`` writes it, so
that its ``load_summary_json`` reads the file and an nnU-Net user finds the numbers where nnU-Net puts them:
``metric_per_case`` (``{"metrics": {"1": {"Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref"}},
"prediction_file", "reference_file"}`` per case), ``mean`` (per label value, or region tuple such as ``"(1, 2)"``)
and ``foreground_mean``. Its numbers follow nnU-Net's conventions (:mod:`medseg.evaluation.nnunet_metrics`: Dice is
undefined, ``null``, when both masks are empty), so they equal what ``nnUNetv2_evaluate_folder`` computes on the same
files. ``foreground_mean`` also holds medseg's foreground means under medseg's lower-case names (``dice``, ``hd95``,
``nsd``, beside nnU-Net's ``Dice``, ``IoU``, ...): nnU-Net reads only its own keys there, and every reader of
``summary["foreground_mean"]["dice"]`` keeps working.

**medseg's view** sits beside it under ``medseg`` with medseg's names: ``metric_per_case`` (``case_id``,
``prediction_file``, ``reference_file``, ``metrics`` per class name with ``dice``, ``hd95`` (mm), ``nsd``, ``n_ref``,
``n_pred``, and the case's ``seconds``), ``mean`` per class name (with ``hd95_n``, how many cases the HD95 mean
covers) and ``foreground_mean`` (``dice``, ``hd95``, ``nsd``), under :data:`~medseg.evaluation.EMPTY_LABEL_POLICY`.
Read it with :func:`medseg_metrics`, which also reads summaries written before nnU-Net's view existed (medseg's view at
the top level). medseg's other sections stay at the top level: ``n_cases``, ``labels`` (names to values),
``empty_label_policy`` in words, and whatever the trainer passes (parameter counts, peak memory, wall time). A
test-time evaluation adds its cost (:mod:`medseg.evaluation.timing`): ``seconds_per_case``, the phase split
``eval_seconds`` and each case's ``seconds``. Every number is finite or ``null``, never NaN, so the file is strict
JSON that any tool can read.

A promptable run adds an ``interactive`` section (:func:`medseg.evaluation.interactive.summarize_interactive`: Dice
after k clicks, NoC, box and propagation Dice per object, case and class); :func:`interactive_per_case` reads its
per-case means for tables, and :func:`is_complete` requires it to cover every case when it is there.

A benchmark runner skips finished runs with :func:`is_complete`; summaries are written atomically, so a crash
leaves either no file or a complete one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.atomic import atomic_write_json
from medseg.evaluation.metrics import (
    EMPTY_LABEL_POLICY,
    METRICS,
    EvaluationError,
    case_metrics,
    foreground_classes,
    spacing_from_affine,
)
from medseg.evaluation.nnunet_metrics import NNUNET_METRICS, nnunet_case, nnunet_means, nnunet_regions

__all__ = [
    "build_summary",
    "evaluate_folder",
    "interactive_per_case",
    "is_complete",
    "medseg_metrics",
    "read_summary",
    "score_case",
    "write_summary",
]

_RESERVED = ("metric_per_case", "mean", "foreground_mean", "medseg", "n_cases", "labels", "empty_label_policy")
_VIEW = ("metric_per_case", "mean", "foreground_mean")  # the sections that nnU-Net's view and medseg's both have


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise EvaluationError(f"a metric value is {value}; metrics must be finite or None (see EMPTY_LABEL_POLICY).")
    return value


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def build_summary(
    per_case: Sequence[Mapping[str, Any]],
    labels: Mapping[str, int | Sequence[int]],
    extras: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect per-case metrics into a ``summary.json`` dictionary.

    Args:
        per_case: one mapping per case as :func:`score_case` returns it: ``case_id``, ``metrics``
            (``{class_name: {metric: value}}`` as returned by :func:`medseg.evaluation.case_metrics`), ``nnunet``
            (nnU-Net's entry, :func:`medseg.evaluation.nnunet_metrics.nnunet_case`) and optionally
            ``prediction_file``/``reference_file``/``seconds``.
        labels: the dataset's ``{class_name: label_value}`` (background is left out of the means).
        extras: run facts stored at the top level (``trainable_params``, ``total_params``, ``peak_memory_mb``,
            ``wall_time_s``, ...); JSON-serialisable, and not one of the reserved keys.

    Returns:
        ``{"metric_per_case", "mean", "foreground_mean"`` (nnU-Net's view, see the module docstring; its
        ``foreground_mean`` also holds medseg's ``dice``, ``hd95``, ``nsd``)``, "medseg":
        {"metric_per_case", "mean": {class: {dice, hd95, nsd, hd95_n, n_ref, n_pred}}, "foreground_mean": {dice,
        hd95, nsd}}, "n_cases", "labels", "empty_label_policy", **extras}``. medseg's ``mean`` averages over cases
        and its ``foreground_mean`` over the foreground classes' means, following :data:`EMPTY_LABEL_POLICY`.

    Raises:
        EvaluationError: no cases, a case lacks a class or nnU-Net's entry (or has it for other labels), a metric is
            NaN/inf, or an extra key is reserved.
    """
    classes = list(foreground_classes(labels))
    if not per_case:
        raise EvaluationError("no cases to summarise; check that the prediction folder is not empty.")
    extras = dict(extras or {})
    clash = sorted(set(extras) & set(_RESERVED))
    if clash:
        raise EvaluationError(f"extras may not use the reserved summary keys {clash}.")
    keys = [str(region) for region in nnunet_regions(labels)]
    cases, nnunet_cases = [], []
    for case in per_case:
        metrics = case.get("metrics")
        case_id = case.get("case_id", "?")
        missing = [c for c in classes if not metrics or c not in metrics]
        if missing:
            raise EvaluationError(f"case {case_id!r} has no metrics for classes {missing}.")
        nnunet = case.get("nnunet")
        if not isinstance(nnunet, Mapping) or list(nnunet.get("metrics") or {}) != keys:
            raise EvaluationError(
                f"case {case_id!r} has no nnU-Net entry for labels {keys} ('nnunet': TP/FP/FN/TN per label); score "
                f"it with medseg.evaluation.score_case or medseg.evaluation.nnunet_metrics.nnunet_case."
            )
        nnunet_cases.append(dict(nnunet))
        clean = {c: {k: (_finite(v) if k in METRICS else v) for k, v in metrics[c].items()} for c in classes}
        entry = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in case.items() if k != "nnunet"}
        cases.append({**entry, "metrics": clean})
    mean: dict[str, dict[str, float | int | None]] = {}
    for c in classes:
        column = {m: [case["metrics"][c].get(m) for case in cases] for m in (*METRICS, "n_ref", "n_pred")}
        mean[c] = {m: _mean(column[m]) for m in METRICS}
        mean[c]["hd95_n"] = sum(v is not None for v in column["hd95"])
        mean[c]["n_ref"] = _mean(column["n_ref"])
        mean[c]["n_pred"] = _mean(column["n_pred"])
    foreground_mean = {m: _mean([mean[c][m] for c in classes]) for m in METRICS}
    nnunet_mean, nnunet_foreground = nnunet_means(nnunet_cases)
    summary = {
        "metric_per_case": nnunet_cases,
        "mean": nnunet_mean,
        "foreground_mean": {**nnunet_foreground, **foreground_mean},
        "medseg": {"metric_per_case": cases, "mean": mean, "foreground_mean": foreground_mean},
        "n_cases": len(cases),
        "labels": {k: ([int(x) for x in v] if isinstance(v, Sequence) else int(v)) for k, v in labels.items()},
        "empty_label_policy": EMPTY_LABEL_POLICY,
        **extras,
    }
    json.dumps(summary, allow_nan=False)  # fail here, not in the writer, on anything non-JSON
    return summary


def write_summary(path: str | os.PathLike[str], summary: Mapping[str, Any]) -> Path:
    """Write ``summary`` as indented strict JSON (no NaN), atomically; returns the path."""
    try:
        json.dumps(summary, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise EvaluationError(f"summary for {path} is not strict JSON ({err}); build it with build_summary().") from err
    return atomic_write_json(path, summary)


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``summary.json``.

    Raises:
        EvaluationError: the file is missing, not JSON (e.g. truncated), or not a summary.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist; run the evaluation first (medseg evaluate).")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvaluationError(f"{path} is not valid JSON ({err}); delete it and evaluate the run again.") from err
    if not isinstance(summary, dict) or any(k not in summary for k in ("metric_per_case", "mean", "n_cases")):
        raise EvaluationError(f"{path} is not a medseg/nnU-Net summary (no metric_per_case/mean/n_cases).")
    return summary


def medseg_metrics(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    """medseg's view of a summary: ``{"metric_per_case", "mean", "foreground_mean"}`` by class name (module docstring).

    A summary written before nnU-Net's view existed held medseg's view at the top level; it is read from there, so
    older run folders stay readable.

    Raises:
        EvaluationError: the summary has neither (e.g. a file written by nnU-Net itself).
    """
    view = summary.get("medseg")
    if isinstance(view, Mapping):
        return view
    cases, foreground = summary.get("metric_per_case") or [], summary.get("foreground_mean") or {}
    nnunets = any(not (isinstance(case, Mapping) and "case_id" in case) for case in cases) or (
        "Dice" in foreground and "dice" not in foreground
    )  # nnU-Net's cases have no case_id, its foreground_mean no lower-case dice
    if not nnunets:
        return {key: summary[key] for key in _VIEW if key in summary}
    raise EvaluationError(
        "this summary.json has no 'medseg' section (dice/hd95/nsd per class); it was not written by medseg. "
        "Evaluate the run with `medseg evaluate run_dir=...`."
    )


def is_complete(path: str | os.PathLike[str], expected_cases: int | None = None) -> bool:
    """Whether ``path`` holds a finished summary: readable, consistent, with every class of every case scored.

    Args:
        path: the run's ``summary.json``.
        expected_cases: number of cases the run must cover (e.g. the fold's validation cases); ``None`` to accept
            any positive number.
    """
    try:
        summary = read_summary(path)
        view = medseg_metrics(summary)
    except EvaluationError:
        return False
    cases, n_cases = view.get("metric_per_case"), summary.get("n_cases")
    if not isinstance(cases, list) or not cases or n_cases != len(cases):
        return False
    if expected_cases is not None and n_cases != expected_cases:
        return False
    if not isinstance(view.get("foreground_mean"), dict) or not isinstance(view.get("mean"), dict):
        return False
    if "medseg" in summary and not _nnunet_view_complete(summary, n_cases):
        return False
    classes = list(foreground_classes(summary.get("labels") or {})) or list(view["mean"])
    for case in cases:
        metrics = case.get("metrics") if isinstance(case, dict) else None
        if not isinstance(metrics, dict) or any(not all(m in metrics.get(c, {}) for m in METRICS) for c in classes):
            return False
    if "interactive" in summary:
        interactive = summary["interactive"]
        per_case = interactive.get("per_case") if isinstance(interactive, dict) else None
        ids = {case.get("case_id") for case in cases}
        if not isinstance(per_case, dict) or set(per_case) != ids or "foreground_mean" not in interactive:
            return False
    return True


def _nnunet_view_complete(summary: Mapping[str, Any], n_cases: int) -> bool:
    """Whether nnU-Net's view covers ``n_cases`` cases, each with every metric of the labels its ``mean`` names."""
    cases, mean = summary.get("metric_per_case"), summary.get("mean")
    if not isinstance(cases, list) or len(cases) != n_cases or not isinstance(mean, dict):
        return False
    if not isinstance(summary.get("foreground_mean"), dict):
        return False
    for case in cases:
        metrics = case.get("metrics") if isinstance(case, dict) else None
        if not isinstance(metrics, dict) or set(metrics) != set(mean):
            return False
        if any(not isinstance(v, dict) or any(m not in v for m in NNUNET_METRICS) for v in metrics.values()):
            return False
    return True


def interactive_per_case(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-case means of a promptable run's interactive metrics, for benchmark tables.

    Returns:
        ``{case_id: {"n_objects", "dice_at_k": [...], "noc85", "noc90", "box_dice", "propagation_dice"}}`` (the keys
        that were scored).

    Raises:
        EvaluationError: the summary has no ``interactive`` section (a dense run, or one evaluated before it existed).
    """
    interactive = summary.get("interactive")
    if not isinstance(interactive, Mapping) or not isinstance(interactive.get("per_case"), Mapping):
        raise EvaluationError(
            "this summary.json has no 'interactive' section; only promptable runs (task=promptable) have one. "
            "Re-evaluate the run with `medseg evaluate run_dir=...`."
        )
    return {case: dict(entry["mean"]) for case, entry in interactive["per_case"].items()}


def _nifti_files(folder: Path, suffix: str) -> dict[str, Path]:
    return {p.name[: -len(suffix)]: p for p in sorted(folder.iterdir()) if p.name.endswith(suffix)}


def evaluate_folder(
    pred_dir: str | os.PathLike[str],
    ref_dir: str | os.PathLike[str],
    labels: Mapping[str, int | Sequence[int]],
    nsd_tolerance_mm: float | Mapping[str, float] = 2.0,
    suffix: str = ".nii.gz",
    output: str | os.PathLike[str] | None = None,
    extras: Mapping[str, Any] | None = None,
    atol_mm: float = 1e-3,
) -> dict[str, Any]:
    """Evaluate every prediction file in ``pred_dir`` against the file of the same name in ``ref_dir``.

    Like ``nnUNetv2_evaluate_folder``, but in medseg's geometry rules: each prediction must lie on its reference's
    grid (same shape, affines equal within ``atol_mm``), and distances use the reference's voxel size in mm.

    Args:
        pred_dir: folder of predicted label maps (``CASE.nii.gz``).
        ref_dir: folder of reference label maps with the same names (e.g. ``labelsTr``).
        labels: ``{class_name: label_value}`` from ``dataset.json``.
        nsd_tolerance_mm: NSD tolerance in mm, one number or per class.
        suffix: file ending that both folders use.
        output: where to write ``summary.json`` (optional).
        extras: run facts stored in the summary.
        atol_mm: tolerance of the affine comparison (mm).

    Raises:
        EvaluationError: no predictions, a reference is missing, or a prediction's shape or affine differs from its
            reference's (the file is named).
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise EvaluationError(f"{folder} is not a folder.")
    predictions, references = _nifti_files(pred_dir, suffix), _nifti_files(ref_dir, suffix)
    if not predictions:
        raise EvaluationError(f"{pred_dir} holds no '*{suffix}' predictions.")
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise EvaluationError(f"no reference in {ref_dir} for predictions {missing[:5]} (expected same file names).")
    per_case = [
        score_case(pred_path, references[case_id], labels, nsd_tolerance_mm, atol_mm, suffix)
        for case_id, pred_path in predictions.items()
    ]
    summary = build_summary(per_case, labels, extras)
    if output is not None:
        write_summary(output, summary)
    return summary


def score_case(
    pred_path: str | os.PathLike[str],
    ref_path: str | os.PathLike[str],
    labels: Mapping[str, int | Sequence[int]],
    nsd_tolerance_mm: float | Mapping[str, float] = 2.0,
    atol_mm: float = 1e-3,
    suffix: str = ".nii.gz",
) -> dict[str, Any]:
    """Score one prediction file against its reference, in :func:`evaluate_folder`'s geometry rules.

    One case at a time, so that an evaluation scores each case as soon as it is written and times it
    (:mod:`medseg.evaluation.timing`).

    Returns:
        The ``per_case`` entry of :func:`build_summary`: ``case_id`` (the file name without ``suffix``),
        ``prediction_file``, ``reference_file``, ``metrics`` (medseg's) and ``nnunet`` (nnU-Net's counts of the same
        label maps, :func:`medseg.evaluation.nnunet_metrics.nnunet_case`).

    Raises:
        EvaluationError: a file is missing, or the prediction's shape or affine differs from its reference's.
    """
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    for path in (pred_path, ref_path):
        if not path.is_file():
            raise EvaluationError(f"{path} does not exist; predictions and references must both be written.")
    pred_image, ref_image = nib.load(pred_path), nib.load(ref_path)
    if pred_image.shape[:3] != ref_image.shape[:3]:
        raise EvaluationError(
            f"{pred_path} has shape {pred_image.shape} but its reference {ref_path} has {ref_image.shape}; "
            f"write predictions on the reference's native grid."
        )
    if not np.allclose(pred_image.affine, ref_image.affine, atol=atol_mm):
        raise EvaluationError(
            f"{pred_path} has a different affine from its reference {ref_path} (beyond {atol_mm} mm):\n"
            f"{np.round(pred_image.affine, 4)}\nvs\n{np.round(ref_image.affine, 4)}"
        )
    prediction = np.rint(np.asanyarray(pred_image.dataobj)).astype(np.int64)
    reference = np.rint(np.asanyarray(ref_image.dataobj)).astype(np.int64)
    metrics = case_metrics(prediction, reference, spacing_from_affine(ref_image.affine), labels, nsd_tolerance_mm)
    case_id = pred_path.name[: -len(suffix)] if pred_path.name.endswith(suffix) else pred_path.name
    return {
        "case_id": case_id,
        "prediction_file": str(pred_path),
        "reference_file": str(ref_path),
        "metrics": metrics,
        "nnunet": nnunet_case(prediction, reference, labels, str(pred_path), str(ref_path)),
    }
