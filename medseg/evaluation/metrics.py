"""Per-case, per-class segmentation metrics on the native grid, with one explicit policy for empty labels.

Metrics are computed by MONAI (``DiceMetric``, ``HausdorffDistanceMetric(percentile=95)``, ``SurfaceDiceMetric``) on
the label maps in the geometry of the input files, never on resampled or cropped patches: distances are in
millimetres, measured with the voxel size of the native grid (the column norms of its affine, so oblique and
anisotropic grids are measured correctly). Only foreground classes (label value != 0) are evaluated.

Empty-label policy (``EMPTY_LABEL_POLICY``; also written into every ``summary.json``):

============================  ======  ======  ===========================================
reference / prediction        Dice    NSD     HD95
============================  ======  ======  ===========================================
both non-empty                MONAI   MONAI   MONAI (mm)
both empty                    1.0     1.0     0.0
reference empty, prediction   0.0     0.0     ``None`` (undefined: one surface is missing)
prediction empty, reference   0.0     0.0     ``None`` (undefined: one surface is missing)
============================  ======  ======  ===========================================

Correctly predicting that a structure is absent (a tumour in a healthy case) is a success and scores as one;
predicting a structure that is absent, or missing one that is present, scores as a complete failure in Dice and NSD.
This is MONAI's ``DiceMetric(ignore_empty=False)``; nnU-Net instead scores "both empty" as NaN and drops it from its
means, which rewards nothing for a correct "absent" call. A distance to a missing surface does not exist, so HD95 is
``None`` there: the HD95 mean leaves those cases out and :mod:`medseg.evaluation.summary` reports how many cases it
covers (``hd95_n``) next to it. No mean ever includes NaN or infinity; ``n_ref`` and ``n_pred`` (voxels) are stored
per case, and ``summary.json`` carries nnU-Net's own view of the same label maps too (its convention, with ``null`` for
its NaN; :mod:`medseg.evaluation.nnunet_metrics`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

from medseg.errors import MedsegError

__all__ = [
    "EMPTY_LABEL_POLICY",
    "METRICS",
    "EvaluationError",
    "case_metrics",
    "foreground_classes",
    "spacing_from_affine",
]

METRICS = ("dice", "hd95", "nsd")

EMPTY_LABEL_POLICY = (
    "Per case and foreground class: reference and prediction both empty -> dice 1, nsd 1, hd95 0; exactly one of them "
    "empty -> dice 0, nsd 0, hd95 null (undefined). Means: dice and nsd average every case (empty cases included with "
    "the values above); hd95 averages the cases where it is defined and hd95_n counts them (null if none). "
    "foreground_mean averages the per-class means over foreground classes, skipping null hd95 means."
)


class EvaluationError(MedsegError):
    """Predictions and references cannot be compared (missing file, different shape or geometry, bad labels)."""


def spacing_from_affine(affine: np.ndarray | torch.Tensor) -> tuple[float, ...]:
    """Voxel size (mm) along each array axis: the norms of the affine's first three columns.

    Unlike the diagonal, the column norms are right for oblique and permuted (e.g. ``LIA``) grids too.
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(matrix, axis=0))


def foreground_classes(labels: Mapping[str, int | Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """The classes to evaluate: every entry of a ``dataset.json`` ``labels`` map except background (value 0).

    A value may be a list of labels (an nnU-Net region such as BraTS' whole tumour), evaluated as their union. An
    entry named ``ignore`` (nnU-Net's unannotated-voxel label) is not a class and is skipped.
    """
    classes = {}
    for name, value in labels.items():
        values = tuple(int(v) for v in value) if isinstance(value, Sequence | np.ndarray) else (int(value),)
        if values == (0,) or name == "ignore":
            continue
        classes[str(name)] = values
    return classes


def _tolerance(nsd_tolerance_mm: float | Mapping[str, float], name: str) -> float:
    if isinstance(nsd_tolerance_mm, Mapping):
        if name not in nsd_tolerance_mm:
            raise EvaluationError(
                f"nsd_tolerance_mm has no tolerance for class {name!r}; give one per class ({sorted(nsd_tolerance_mm)}"
                f" given) or a single number in mm."
            )
        return float(nsd_tolerance_mm[name])
    return float(nsd_tolerance_mm)


def _mask(array: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    return np.isin(array, values) if len(values) > 1 else array == values[0]


def _monai_metrics(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerance: float) -> dict:
    """Dice, HD95 (mm) and NSD of two non-empty binary masks, computed by MONAI."""
    y_pred = torch.from_numpy(pred)[None, None]
    y = torch.from_numpy(ref)[None, None]
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(y_pred.float(), y.float())
    with warnings.catch_warnings():  # MONAI's own metrics call a deprecated argument of get_mask_edges
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            y_pred, y, spacing=list(spacing)
        )
        nsd = SurfaceDiceMetric([tolerance], include_background=True, reduction="none")(
            y_pred, y, spacing=list(spacing)
        )
    return {"dice": float(dice.item()), "hd95": float(hd95.item()), "nsd": float(nsd.item())}


def case_metrics(
    prediction: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
    labels: Mapping[str, int | Sequence[int]],
    nsd_tolerance_mm: float | Mapping[str, float] = 2.0,
) -> dict[str, dict[str, float | int | None]]:
    """Dice, HD95 and normalised surface Dice of one case, per foreground class, under the module's empty policy.

    Args:
        prediction: ``(X, Y, Z)`` (or 2D) integer label map on the native grid.
        reference: the reference label map, same shape.
        spacing_mm: voxel size (mm) along each array axis, e.g. :func:`spacing_from_affine` of the native affine.
        labels: ``{class_name: label_value}`` as in ``dataset.json`` (background is skipped; a list value is a
            region, evaluated as the union of its labels).
        nsd_tolerance_mm: NSD tolerance in mm, one number or ``{class_name: mm}``.

    Returns:
        ``{class_name: {"dice", "hd95" (mm, or None), "nsd", "n_ref", "n_pred" (voxels)}}``.

    Raises:
        EvaluationError: the shapes differ, the spacing has the wrong length or is not positive, or a tolerance is
            missing.
    """
    prediction = np.asarray(prediction.cpu() if isinstance(prediction, torch.Tensor) else prediction)
    reference = np.asarray(reference.cpu() if isinstance(reference, torch.Tensor) else reference)
    if prediction.shape != reference.shape:
        raise EvaluationError(
            f"prediction shape {prediction.shape} differs from reference shape {reference.shape}; predictions must be "
            f"written on the reference's native grid (see medseg.inference.to_native)."
        )
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != reference.ndim or min(spacing) <= 0:
        raise EvaluationError(f"spacing_mm must give {reference.ndim} positive voxel sizes (mm), got {spacing}.")
    results: dict[str, dict[str, float | int | None]] = {}
    for name, values in foreground_classes(labels).items():
        tolerance = _tolerance(nsd_tolerance_mm, name)
        pred, ref = _mask(prediction, values), _mask(reference, values)
        n_pred, n_ref = int(pred.sum()), int(ref.sum())
        if n_pred == 0 and n_ref == 0:
            scores: dict[str, float | None] = {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
        elif n_pred == 0 or n_ref == 0:
            scores = {"dice": 0.0, "hd95": None, "nsd": 0.0}
        else:
            scores = _monai_metrics(pred, ref, spacing, tolerance)
        results[name] = {**scores, "n_ref": n_ref, "n_pred": n_pred}
    return results
