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

Limits. A prompt is a handful of clicks or boxes per object, so a file far beyond that is a mistake (or an attack)
that would otherwise exhaust memory: a file may hold at most :data:`MAX_OBJECTS` objects, :data:`MAX_BOXES` boxes
in all and :data:`MAX_POINTS` points per object, and be at most :data:`MAX_FILE_BYTES` long. Labels go up to 65535
(label maps are ``uint16``), and coordinates must be finite numbers (Python's JSON reader accepts ``NaN`` and
``Infinity``; they are refused here, naming the object). :func:`check_prompts` checks all of this, and everything
else that does not depend on the volume, before any model loads.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.atomic import atomic_write_text
from medseg.prompts.contract import PromptError, Prompts
from medseg.prompts.geometry import check_inside, world_box_to_voxel, world_to_voxel

__all__ = [
    "MAX_BOXES",
    "MAX_FILE_BYTES",
    "MAX_LABEL",
    "MAX_OBJECTS",
    "MAX_POINTS",
    "ObjectPrompts",
    "PromptFileError",
    "check_prompts",
    "dump_prompts",
    "load_prompts",
    "parse_prompts",
]

MAX_OBJECTS = 1000  # objects per file
MAX_BOXES = 1000  # boxes per file, all objects together
MAX_POINTS = 1000  # points per object
MAX_FILE_BYTES = 50 * 1024 * 1024  # checked before the file is read
MAX_LABEL = int(np.iinfo(np.uint16).max)  # label maps are uint16 (medseg.inference.writers)
_SPLIT = "Split the objects over several prompts files and run medseg predict once per file (each into its own -o)."
_FAR = 2.0**31  # beyond this a continuous voxel index is no position in any volume (and int64 rounding would wrap)

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
        try:
            numbers = [float(v) for v in row]
        except OverflowError:  # an integer beyond any float
            numbers = [math.inf]
        if not all(math.isfinite(v) for v in numbers):
            raise _fail(
                source, f"{where}[{index}]", f"{row!r} holds NaN or an infinite value",
                "Give finite coordinates (voxel indices, or millimetres with \"space\": \"world\").",
            )  # fmt: skip
        rows.append(numbers)
    return np.asarray(rows, dtype=np.float64).reshape(-1, width)


def _integral(array: np.ndarray, source: str, where: str) -> np.ndarray:
    if not np.allclose(array, np.rint(array)):
        raise _fail(source, where, "voxel indices must be integers", 'Use "space": "world" for coordinates in mm.')
    return array


def _near(ijk: np.ndarray, shape: Sequence[int], what: str) -> np.ndarray:
    """``ijk`` (continuous voxel indices), after refusing values so far outside that rounding to int64 would wrap."""
    if ijk.size and not (np.abs(ijk) < _FAR).all():
        check_inside(ijk.reshape(-1, 3), shape, what)  # raises, naming the continuous index (not a wrapped -9.2e18)
    return ijk


def _world_box(box: np.ndarray, affine: object, shape: Sequence[int], what: str) -> np.ndarray:
    corners = np.array(list(itertools.product(*zip(box[:3], box[3:]))))  # its 8 corners (mm)
    _near(world_to_voxel(corners, affine), shape, what)
    return world_box_to_voxel(box, affine, shape, what, True)


def _fields(entry: object, index: int, source: str) -> tuple[int, np.ndarray, np.ndarray, list[int]]:
    """An object's label, boxes, points and point labels, checked for everything but the volume."""
    where = f"object {index}"
    if not isinstance(entry, Mapping):
        raise _fail(source, where, f"expected a JSON object, got {type(entry).__name__}", 'Write {"label": 1, ...}.')
    unknown = set(entry) - _OBJECT_KEYS
    if unknown:
        raise _fail(source, where, f"unknown keys {sorted(unknown)}", f"Allowed keys: {sorted(_OBJECT_KEYS)}.")
    label = entry.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or not 1 <= label <= MAX_LABEL:
        raise _fail(
            source, where, f"label must be a positive integer up to {MAX_LABEL} (label maps are uint16), got {label!r}",
            'E.g. "label": 1.',
        )  # fmt: skip
    points_given = entry.get("points", [])
    if isinstance(points_given, list) and len(points_given) > MAX_POINTS:
        raise _fail(
            source, f"{where}, points", f"{len(points_given)} points, more than the {MAX_POINTS} allowed per object",
            f"A few clicks per object are what a promptable model takes; keep at most {MAX_POINTS}.",
        )  # fmt: skip
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
    return label, boxes, points, labels


def _object(entry: object, index: int, space: str, affine, shape, source: str) -> ObjectPrompts:
    where = f"object {index}"
    label, boxes, points, labels = _fields(entry, index, source)
    try:
        if space == "world":  # an oblique world box may reach a little outside the grid: clipped, unless all outside
            voxel_points = _near(world_to_voxel(points, affine).reshape(-1, 3), shape, f"{where}, points")
            voxel_boxes = [_world_box(box, affine, shape, f"{where}, box {b}") for b, box in enumerate(boxes)]
            voxel_boxes = np.asarray(voxel_boxes, dtype=np.int64).reshape(-1, 6)
        else:
            voxel_points = _near(_integral(points, source, f"{where}, points"), shape, f"{where}, points")
            voxel_boxes = _near(_integral(boxes, source, f"{where}, boxes"), shape, f"{where}, boxes")
        voxel_points, voxel_boxes = np.rint(voxel_points).astype(np.int64), np.rint(voxel_boxes).astype(np.int64)
        for p, point in enumerate(voxel_points):
            check_inside(point, shape, f"{where}, point {p}")
        for b, box in enumerate(voxel_boxes):
            if (box[3:] < box[:3]).any():
                raise _fail(
                    source,
                    f"{where}, box {b}",
                    f"{box.tolist()} has an end before its start",
                    "Write boxes as [i0, j0, k0, i1, j1, k1] with i1 >= i0, j1 >= j0, k1 >= k0 (inclusive).",
                )
            check_inside(box.reshape(2, 3), shape, f"{where}, box {b}")
    except PromptFileError:
        raise
    except PromptError as error:
        raise PromptFileError(f"{source}: {error}") from None
    return ObjectPrompts(int(label), voxel_boxes, voxel_points, np.asarray(labels, dtype=np.int64))


def _document(data: object, source: str) -> tuple[str, list]:
    """The space and the objects of a decoded prompts document, checked for their form and counts."""
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
    if len(objects) > MAX_OBJECTS:
        raise _fail(source, "objects", f"{len(objects)} objects, more than the {MAX_OBJECTS} allowed per file", _SPLIT)
    boxes = sum(len(o["boxes"]) for o in objects if isinstance(o, Mapping) and isinstance(o.get("boxes"), list))
    if boxes > MAX_BOXES:
        raise _fail(source, "objects", f"{boxes} boxes in all, more than the {MAX_BOXES} allowed per file", _SPLIT)
    return space, objects


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
    space, objects = _document(data, source)
    return [_object(entry, index, space, affine, shape, source) for index, entry in enumerate(objects)]


def load_prompts(path: str | os.PathLike[str], affine: object, shape: Sequence[int]) -> list[ObjectPrompts]:
    """Read and validate a prompts file, in voxel indices of the input volume (``affine``, ``shape``).

    Raises:
        PromptFileError: the file is missing or not JSON, or any field is malformed or outside the volume; the
            message names the file, the object index and the fix.
    """
    path = Path(path)
    return parse_prompts(_read(path), affine, shape, str(path))


def check_prompts(path: str | os.PathLike[str]) -> None:
    """Check a prompts file for everything that does not depend on the volume, e.g. before any model loads.

    Raises:
        PromptFileError: as :func:`load_prompts` would, for all but coordinates outside a volume.
    """
    path = Path(path)
    _, objects = _document(_read(path), str(path))
    for index, entry in enumerate(objects):
        _fields(entry, index, str(path))


def _read(path: Path) -> object:
    """The decoded JSON of a prompts file, read only when of a sane size and parsed without deep recursion."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PromptFileError(
                f"{path}: {size / 2**20:.1f} MiB, more than the {MAX_FILE_BYTES // 2**20} MiB a prompts file may be "
                f"(at most {MAX_OBJECTS} objects, {MAX_BOXES} boxes and {MAX_POINTS} points per object). {_SPLIT}"
            )
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise PromptFileError(f"{path}: cannot read the prompts file ({error.strerror or error}).") from None
    except UnicodeDecodeError:
        raise PromptFileError(f"{path}: not UTF-8 text, so not a prompts file (JSON). Check the path.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(
            f"{path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}. Check brackets, commas "
            f"and quotes (JSON needs double quotes and no trailing commas)."
        ) from None
    except RecursionError:
        raise PromptFileError(
            f"{path}: nested too deeply to be a prompts file (a valid one is 4 levels deep: "
            f'{{"objects": [{{"boxes": [[...]]}}]}}). Check that it is the right file.'
        ) from None
    except ValueError as error:  # e.g. an integer of more than 4300 digits
        raise PromptFileError(f"{path}: not a usable JSON document ({error}). Check the path.") from None
    return data


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
