"""``medseg predict`` on a classifier: one CSV row of class probabilities per case.

A segmenter writes one file per case; a classifier's natural output is a table, as nnU-Net-style tools and MONAI's
classification bundles write it: ``OUTPUT_DIR/probabilities.csv`` with ``case``, one ``p_<label name>`` column per
class (in the training label order) and ``prediction`` (the most probable class for single-label kinds, the
classes at or above 0.5 joined with ``;`` for multi-label ones). The rows are written once, atomically, after every
case ran, so a crash never leaves a half table; failed cases are reported like a segmenter's.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from medseg.atomic import atomic_write_text
from medseg.errors import ConfigError, InputShapeError
from medseg.inference.cases import Case
from medseg.inference.loaded import LoadedModel
from medseg.inference.predictor import PredictReport

__all__ = ["PROBABILITIES_CSV", "classification_row", "predict_classifier_cases"]

PROBABILITIES_CSV = "probabilities.csv"


def _label_kind(loaded: LoadedModel) -> str:
    label = loaded.config.get("label") if loaded.config is not None else None
    return str(label.get("kind", "multiclass")) if label is not None else "multiclass"


def classification_row(loaded: LoadedModel, name: str, probabilities: np.ndarray) -> dict[str, object]:
    """The CSV row of one case: its name, each class probability (6 decimals) and the prediction."""
    names = [str(loaded.label_names[i]) for i in range(len(probabilities))]
    row: dict[str, object] = {"case": name}
    row.update({f"p_{n}": f"{float(p):.6f}" for n, p in zip(names, probabilities, strict=True)})
    if _label_kind(loaded) == "multilabel":
        row["prediction"] = ";".join(n for n, p in zip(names, probabilities, strict=True) if p >= 0.5)
    else:
        row["prediction"] = names[int(np.argmax(probabilities))]
    return row


def predict_classifier_cases(
    loaded: LoadedModel,
    cases: list[Case],
    output_dir: str | os.PathLike[str],
    report: PredictReport,
    advance=lambda description: None,
    debug: bool = False,
) -> Path | None:
    """Classify every case and write ``output_dir/probabilities.csv``; failures go to ``report.failed``.

    Args:
        loaded: a ``classifier`` model (:func:`medseg.classify.load_classifier`).
        cases: the inputs (:func:`medseg.inference.cases.discover_cases`), each loaded and preprocessed exactly as
            in training (:func:`medseg.classify.predict_probabilities`); non-finite probabilities (a NaN-filled
            image) fail the case.
        output_dir: created if needed.
        report: a :class:`~medseg.inference.predictor.PredictReport` to fill.
        advance: progress callback, called with each case's name.
        debug: let the first error propagate instead of recording it.

    Returns:
        The CSV path, or ``None`` when no case succeeded (then nothing is written).
    """
    from medseg.classify import predict_probabilities

    if loaded.kind != "classifier":
        raise ConfigError(f"{loaded.source} is a {loaded.kind} model, not a classifier.")

    def row_of(case: Case) -> dict[str, object]:
        probabilities = predict_probabilities(loaded, str(case.path))
        if not np.all(np.isfinite(probabilities)):
            raise InputShapeError(f"{case.path}: the classifier gave non-finite probabilities (NaN or inf voxels?).")
        return classification_row(loaded, case.name, probabilities)

    rows: list[dict[str, object]] = []
    for case in cases:
        row = report.attempt(case.name, lambda case=case: row_of(case), debug)
        if row is not None:
            rows.append(row)
        advance(case.name)
    if not rows:
        return None
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    target = Path(output_dir) / PROBABILITIES_CSV
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, buffer.getvalue())
    for row in rows:
        report.written[str(row["case"])] = [target]
    return target
