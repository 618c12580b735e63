"""The prompts file of ``medseg predict --prompts``: boxes and clicks per object, in voxels or world millimetres.

Format (JSON)::

    {
      "space": "voxel",                       # or "world"
      "objects": [
        {"label": 1,                          # label value written for this object in the output
         "boxes": [[i0, j0, k0, i1, j1, k1]], # optional; inclusive; k0 == k1 is a 2D box on slice k0
         "points": [[i, j, k], [i, j, k]],    # optional
         "point_labels": [1, 0]}              # one per point: 1 inside the object, 0 outside
      ]
    }

``"voxel"`` coordinates are array indices of the input file, in its array order (for a DICOM series, the order
MONAI's reader gives); ``"world"`` coordinates are RAS+ millimetres as in a NIfTI affine (convert DICOM LPS with
:func:`medseg.prompts.geometry.lps_to_ras`). A world point goes to the nearest voxel; a world box to the voxel box
covering its corners. :func:`load_prompts` always returns voxel space, checked against the volume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.atomic import atomic_write_text
from medseg.prompts.contract import PromptError, Prompts
from medseg.prompts.geometry import check_inside, world_box_to_voxel, world_to_voxel

__all__ = ["ObjectPrompts", "PromptFileError", "dump_prompts", "load_prompts", "parse_prompts"]

_TOP_KEYS = {"space", "objects"}
_OBJECT_KEYS = {"label", "boxes", "points", "point_labels"}


class PromptFileError(PromptError):
    """A prompts file is unreadable, malformed, or points outside the volume it is meant for."""


@dataclass(frozen=True)
class ObjectPrompts:
    """The prompts of one object, in voxel indices of the input volume.

    Attributes:
        label: the label value the object gets in the output.
        boxes: ``(M, 6)`` int64 inclusive boxes ``(i0, j0, k0, i1, j1, k1)``; ``k0 == k1`` is a 2D box on slice k0.
        points: ``(P, 3)`` int64 voxel indices.
        point_labels: ``(P,)`` int64, 1 positive and 0 negative.
    """

    label: int
    boxes: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray

    @property
    def box_is_2d(self) -> np.ndarray:
        """``(M,)`` bool: which boxes are 2D boxes on one slice (``k0 == k1``)."""
        return self.boxes[:, 2] == self.boxes[:, 5]

    def to_prompts(self) -> Prompts:
        """A :class:`Prompts` batch: one item per box, each with all the points; one item when there is no box."""
        count = max(1, len(self.boxes))
        fields = {"class_vector": np.full((count, 1), self.label)}
        if len(self.boxes):
            fields["box"] = self.boxes.astype(np.float32)
        if len(self.points):
            fields["point_coords"] = np.repeat(self.points[None].astype(np.float32), count, 0)
            fields["point_labels"] = np.repeat(self.point_labels[None], count, 0)
        return Prompts(**fields)


def _fail(source: str, where: str, problem: str, fix: str) -> PromptFileError:
    return PromptFileError(f"{source}: {where}: {problem}. {fix}")


def _numbers(value: object, width: int, source: str, where: str, example: str) -> np.ndarray:
    fix = f"Write it as a list of lists of {width} numbers, e.g. {example}."
    if not isinstance(value, list):
        raise _fail(source, where, f"expected a list, got {type(value).__name__}", fix)
    rows = []
    for index, row in enumerate(value):
        valid = isinstance(row, list) and len(row) == width
        if not valid or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in row):
            raise _fail(source, f"{where}[{index}]", f"expected {width} numbers, got {row!r}", fix)
        rows.append([float(v) for v in row])
    return np.asarray(rows, dtype=np.float64).reshape(-1, width)


def _integral(array: np.ndarray, source: str, where: str) -> np.ndarray:
    if not np.allclose(array, np.rint(array)):
        raise _fail(source, where, "voxel indices must be integers", 'Use "space": "world" for coordinates in mm.')
    return np.rint(array).astype(np.int64)


def _object(entry: object, index: int, space: str, affine, shape, source: str) -> ObjectPrompts:
    where = f"object {index}"
    if not isinstance(entry, Mapping):
        raise _fail(source, where, f"expected a JSON object, got {type(entry).__name__}", 'Write {"label": 1, ...}.')
    unknown = set(entry) - _OBJECT_KEYS
    if unknown:
        raise _fail(source, where, f"unknown keys {sorted(unknown)}", f"Allowed keys: {sorted(_OBJECT_KEYS)}.")
    label = entry.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or label < 1:
        raise _fail(source, where, f"label must be a positive integer, got {label!r}", 'E.g. "label": 1.')
    boxes = _numbers(entry.get("boxes", []), 6, source, f"{where}, boxes", "[[10, 20, 5, 40, 60, 5]]")
    points = _numbers(entry.get("points", []), 3, source, f"{where}, points", "[[30, 40, 5]]")
    labels = entry.get("point_labels", [])
    if not isinstance(labels, list) or any(v not in (0, 1) or isinstance(v, bool) for v in labels):
        raise _fail(source, f"{where}, point_labels", f"expected a list of 0/1, got {labels!r}", "1 = inside, 0 = out.")
    if len(labels) != len(points):
        raise _fail(
            source,
            where,
            f"{len(points)} points but {len(labels)} point_labels",
            "Give one label per point (1 inside the object, 0 outside), in the same order.",
        )
    if not len(boxes) and not len(points):
        raise _fail(source, where, "no boxes and no points", "Give at least one box or one positive point.")
    try:
        if space == "world":  # an oblique world box may reach a little outside the grid: clipped, unless all outside
            voxel_points = world_to_voxel(points, affine, round=True).reshape(-1, 3)
            voxel_boxes = [
                world_box_to_voxel(box, affine, shape, f"{where}, box {b}", True) for b, box in enumerate(boxes)
            ]
            voxel_boxes = np.asarray(voxel_boxes, dtype=np.int64).reshape(-1, 6)
        else:
            voxel_points = _integral(points, source, f"{where}, points")
            voxel_boxes = _integral(boxes, source, f"{where}, boxes")
        for b, box in enumerate(voxel_boxes):
            if (box[3:] < box[:3]).any():
                raise _fail(
                    source,
                    f"{where}, box {b}",
                    f"{box.tolist()} has an end before its start",
                    "Write boxes as [i0, j0, k0, i1, j1, k1] with i1 >= i0, j1 >= j0, k1 >= k0 (inclusive).",
                )
            check_inside(box.reshape(2, 3), shape, f"{where}, box {b}")
        for p, point in enumerate(voxel_points):
            check_inside(point, shape, f"{where}, point {p}")
    except PromptFileError:
        raise
    except PromptError as error:
        raise PromptFileError(f"{source}: {error}") from None
    return ObjectPrompts(int(label), voxel_boxes, voxel_points, np.asarray(labels, dtype=np.int64))


def parse_prompts(data: object, affine: object, shape: Sequence[int], source: str = "prompts") -> list[ObjectPrompts]:
    """Validate a decoded prompts document and bring it to voxel indices of the volume (see the module docstring).

    Args:
        data: the decoded JSON.
        affine: the input volume's 4x4 voxel-to-world affine (RAS+ mm), used for ``"space": "world"``.
        shape: the input volume's spatial shape (voxels, array order).
        source: how errors name the document (the file path).

    Raises:
        PromptFileError: naming ``source``, the object index and the fix.
    """
    if len(shape) != 3:
        raise PromptFileError(f"{source}: prompts files describe 3D volumes; the volume's shape is {tuple(shape)}.")
    if not isinstance(data, Mapping):
        raise _fail(
            source,
            "top level",
            f"expected a JSON object, got {type(data).__name__}",
            'Write {"space": "voxel", "objects": [...]}.',
        )
    unknown, missing = set(data) - _TOP_KEYS, _TOP_KEYS - set(data)
    if unknown or missing:
        raise _fail(
            source,
            "top level",
            f"unknown keys {sorted(unknown)}, missing keys {sorted(missing)}",
            'Write exactly {"space": "voxel" | "world", "objects": [...]}.',
        )
    space = data["space"]
    if space not in ("voxel", "world"):
        raise _fail(
            source,
            "space",
            f"must be 'voxel' or 'world', got {space!r}",
            "Use voxel for array indices of the input file, world for RAS+ millimetres.",
        )
    objects = data["objects"]
    if not isinstance(objects, list) or not objects:
        raise _fail(source, "objects", "must be a non-empty list", 'Write "objects": [{"label": 1, "boxes": [...]}].')
    return [_object(entry, index, space, affine, shape, source) for index, entry in enumerate(objects)]


def load_prompts(path: str | os.PathLike[str], affine: object, shape: Sequence[int]) -> list[ObjectPrompts]:
    """Read and validate a prompts file, in voxel indices of the input volume (``affine``, ``shape``).

    Raises:
        PromptFileError: the file is missing or not JSON, or any field is malformed or outside the volume; the
            message names the file, the object index and the fix.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PromptFileError(f"{path}: cannot read the prompts file ({error.strerror or error}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(
            f"{path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}. Check brackets, commas "
            f"and quotes (JSON needs double quotes and no trailing commas)."
        ) from None
    return parse_prompts(data, affine, shape, str(path))


def dump_prompts(objects: Sequence[ObjectPrompts], path: str | os.PathLike[str]) -> None:
    """Write objects as a voxel-space prompts file (atomically), e.g. prompts simulated for a benchmark."""
    document = {
        "space": "voxel",
        "objects": [
            {
                "label": int(obj.label),
                "boxes": obj.boxes.astype(int).tolist(),
                "points": obj.points.astype(int).tolist(),
                "point_labels": obj.point_labels.astype(int).tolist(),
            }
            for obj in objects
        ],
    }
    atomic_write_text(Path(path), json.dumps(document, indent=2) + "\n")
