"""Classification datasets: a CSV (or JSON) table of image paths, label columns and optional subgroup columns.

One row per case::

    case_id,image,level,ventricles,site,split
    mni_z040,images/mni_z040.nii.gz,basal,1,A,train

* ``image_columns``: one column per channel file (NIfTI, DICOM series folder, PNG/JPEG); paths relative to the
  table's folder.
* ``label_columns`` and ``label_kind``:

  ==============  ===========================  ======================================================================
  kind            columns                      target and outputs
  ==============  ===========================  ======================================================================
  ``binary``      one, values 0/1 (or the      class index; 2 softmax outputs ``[negative, positive]``
                  two ``classes`` names)
  ``multiclass``  one                          class index into ``classes`` (default: the sorted values)
  ``ordinal``     one; ``classes`` in order    class index; softmax outputs, quadratic kappa in the metrics
  ``multilabel``  one per label, values 0/1    0/1 vector; one sigmoid output per column
  ==============  ===========================  ======================================================================

* ``subgroup_columns`` (sex, age band, site...) are carried for per-subgroup metrics; an empty cell is "unknown".
* ``split`` (optional): ``train``, ``val`` or ``test`` per row. Without it, every row is a training case and the test
  cases must come from another table.

A JSON table is a list of such rows (objects), or ``{"cases": [...]}``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DatasetError

__all__ = [
    "LABEL_KINDS",
    "SPLITS",
    "ClassificationCase",
    "LabelSpec",
    "check_classification_folder",
    "read_classification_table",
    "read_rows",
    "targets_array",
]

#: What a table's labels can mean (see the module docstring); models, metrics and summaries check against it.
LABEL_KINDS = ("binary", "multiclass", "multilabel", "ordinal")
SPLITS = ("train", "val", "test")
_TRUE = {"1", "1.0", "true", "yes", "y", "positive", "present"}
_FALSE = {"0", "0.0", "false", "no", "n", "negative", "absent"}


@dataclass(frozen=True)
class LabelSpec:
    """What the label columns mean.

    Attributes:
        kind: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``.
        names: one name per model output (class names, or the label columns for multi-label).
        columns: the table's label columns.
    """

    kind: str
    names: tuple[str, ...]
    columns: tuple[str, ...]

    @property
    def num_outputs(self) -> int:
        """Width of the classifier's output (2 for binary: softmax over negative/positive)."""
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, stored next to trained classifiers."""
        return {"kind": self.kind, "names": list(self.names), "columns": list(self.columns)}


@dataclass
class ClassificationCase:
    """One row of the table.

    Attributes:
        case_id: unique id.
        images: channel files, absolute paths.
        target: class index, or a 0/1 list for multi-label.
        subgroups: ``{column: value or None}``.
        split: ``train``, ``val``, ``test`` or ``None`` (not assigned in the table).
    """

    case_id: str
    images: list[Path]
    target: int | list[int]
    subgroups: dict[str, str | None] = field(default_factory=dict)
    split: str | None = None


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a CSV (header line first) or JSON table as ``{column: text}``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"classification table {path} does not exist; give data.table as a CSV or JSON file.")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path} is not valid JSON ({err}).") from err
        rows = data.get("cases") if isinstance(data, Mapping) else data
        if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
            raise DatasetError(f"{path} must hold a list of case objects, or {{'cases': [...]}}.")
        return [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in rows]
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(handle)]


def _binary(value: str, where: str, classes: Sequence[str] | None) -> int:
    if classes is not None and value in classes:
        return list(classes).index(value)
    low = value.lower()
    if low in _TRUE:
        return 1
    if low in _FALSE:
        return 0
    raise DatasetError(f"{where}: {value!r} is not a binary label; use 0/1 (or true/false, or the names {classes}).")


def _class_names(values: list[str], classes: Sequence[str] | None, kind: str, column: str, path: Path) -> list[str]:
    if classes is not None:
        unknown = sorted(set(values) - {str(c) for c in classes})
        if unknown:
            raise DatasetError(f"{path}, column {column!r}: values {unknown} are not in data.classes {list(classes)}.")
        return [str(c) for c in classes]
    if kind == "ordinal":
        raise DatasetError(
            f"{path}: ordinal labels need their order; set data.classes to the values of {column!r} from lowest to "
            f"highest, e.g. classes: [mild, moderate, severe]."
        )
    unique = sorted(set(values))
    try:
        return sorted(unique, key=float)
    except ValueError:
        return unique


def read_classification_table(
    path: str | os.PathLike[str],
    image_columns: Sequence[str] = ("image",),
    label_columns: Sequence[str] = ("label",),
    label_kind: str = "multiclass",
    classes: Sequence[str] | None = None,
    subgroup_columns: Sequence[str] = (),
    id_column: str = "case_id",
    split_column: str = "split",
) -> tuple[list[ClassificationCase], LabelSpec]:
    """Read and check a classification table (see the module docstring).

    Raises:
        DatasetError: a missing column or file, an empty or unknown label value, a duplicated case id, or a split
            value other than train/val/test; the message names the file, row and column.
    """
    path = Path(path)
    if label_kind not in LABEL_KINDS:
        raise DatasetError(f"data.label_kind must be one of {LABEL_KINDS}, got {label_kind!r}.")
    rows = read_rows(path)
    if not rows:
        raise DatasetError(f"{path} has no rows.")
    columns = [id_column, *image_columns, *label_columns, *subgroup_columns]
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise DatasetError(f"{path} has no column(s) {missing}; its columns are {sorted(rows[0])}.")
    if label_kind != "multilabel" and len(label_columns) != 1:
        raise DatasetError(f"{label_kind} labels come from one column; got data.label_columns={list(label_columns)}.")
    for i, row in enumerate(rows):
        empty = [c for c in (id_column, *image_columns, *label_columns) if not row.get(c)]
        if empty:
            raise DatasetError(f"{path}, row {i + 2}: empty {empty}; every case needs an id, its images and labels.")
    if label_kind == "multilabel":
        names = [str(c) for c in label_columns]
    elif label_kind == "binary":
        column = label_columns[0]
        names = [str(c) for c in classes] if classes is not None else [f"no_{column}", str(column)]
        if len(names) != 2:
            raise DatasetError(f"binary labels have two classes (negative, positive); data.classes={names}.")
    else:
        names = _class_names([r[label_columns[0]] for r in rows], classes, label_kind, label_columns[0], path)
    spec = LabelSpec(label_kind, tuple(names), tuple(label_columns))
    cases, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{path}, row {i + 2}"
        case_id = row[id_column]
        if case_id in seen:
            raise DatasetError(f"{where}: case id {case_id!r} appears twice.")
        seen.add(case_id)
        if label_kind == "multilabel":
            target: int | list[int] = [_binary(row[c], f"{where}, column {c!r}", None) for c in label_columns]
        elif label_kind == "binary":
            target = _binary(row[label_columns[0]], f"{where}, column {label_columns[0]!r}", classes)
        else:
            target = names.index(row[label_columns[0]])
        images = [(path.parent / row[c]).resolve() for c in image_columns]
        absent = [str(p) for p in images if not p.exists()]
        if absent:
            raise DatasetError(f"{where}: image file(s) {absent} do not exist (paths are relative to {path.parent}).")
        split = row.get(split_column) or None
        if split is not None and split not in SPLITS:
            raise DatasetError(f"{where}: split {split!r} must be one of {SPLITS} or empty.")
        subgroups = {c: (row[c] or None) for c in subgroup_columns}
        cases.append(ClassificationCase(case_id, images, target, subgroups, split))
    return cases, spec


def targets_array(cases: Sequence[ClassificationCase]) -> np.ndarray:
    """Targets of ``cases`` as ``(N,)`` indices or ``(N, K)`` 0/1."""
    return np.asarray([c.target for c in cases], dtype=np.int64)


def check_classification_folder(folder: str | os.PathLike[str], table_names: Sequence[str]) -> tuple[list[str], str]:
    """Problems of a classification dataset folder, and a one-line summary of what it holds.

    ``medseg validate`` does not know which label columns a run will use, so it checks what every run needs: the
    table reads, case ids are unique, every image column's files exist, and splits are valid. Every problem is
    listed (one line each, naming the row and column) rather than stopping at the first.
    """
    folder = Path(folder)
    table = next((folder / n for n in table_names if (folder / n).is_file()), None)
    if table is None:
        return [f"{folder}: no {' or '.join(table_names)} (a classification dataset's table)."], ""
    try:
        rows = read_rows(table)
    except DatasetError as err:
        return [str(err)], ""
    if not rows:
        return [f"{table} has no rows."], ""
    problems, seen = [], set()
    image_columns = [c for c in rows[0] if c == "image" or c.startswith("image_")]
    if "case_id" not in rows[0] or not image_columns:
        problems.append(f"{table}: needs a case_id column and an image column (image, or image_0000, image_0001...).")
    for i, row in enumerate(rows):
        where = f"{table}, row {i + 2}"
        case_id = row.get("case_id", "")
        if case_id in seen:
            problems.append(f"{where}: case id {case_id!r} appears twice.")
        seen.add(case_id)
        for column in image_columns:
            if not row.get(column) or not (folder / row[column]).exists():
                problems.append(f"{where}, column {column!r}: image {row.get(column)!r} does not exist.")
        if row.get("split") and row["split"] not in SPLITS:
            problems.append(f"{where}: split {row['split']!r} must be one of {SPLITS} or empty.")
    splits = {s: sum(r.get("split") == s for r in rows) for s in SPLITS}
    labels = [c for c in rows[0] if c not in {"case_id", "split", *image_columns}]
    summary = f"{len(rows)} cases ({', '.join(f'{n} {s}' for s, n in splits.items())}); columns {', '.join(labels)}"
    return problems, summary
