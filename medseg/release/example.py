"""A release's ``example/``: a few slices of a real test case, and the label map the model must give for them.

The example is cut from one test case of the run's dataset with nibabel's slicer, which keeps the geometry exact
(the affine is shifted to the first kept voxel). Along the slice axis of a 2-D model it keeps ``slices`` consecutive
slices centred on the one with the most labelled voxels; for a 3-D model, a block of at most ``slices`` voxels per
axis around the labelled centre. The expected output is the released model's own prediction on that input, made by
the code of ``medseg predict`` on the input's native grid, so ``medseg verify`` can check that a rebuilt copy gives
the same labels (Dice >= 0.999 per label, or identical voxels; the tolerance covers other hardware and thread counts).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.atomic import atomic_path, atomic_write_json
from medseg.data.io import load_case
from medseg.inference import write_label_map
from medseg.inference.dense import predict_dense
from medseg.inference.loaded import LoadedModel

__all__ = [
    "EXAMPLE_EXPECTED",
    "EXAMPLE_INFO",
    "MIN_DICE",
    "compare_label_maps",
    "crop_example",
    "predict_label_map",
    "read_example",
    "write_expected",
]

EXAMPLE_INFO = "example/example.json"
EXAMPLE_EXPECTED = "example/expected_label.nii.gz"
MIN_DICE = 0.999


def _window(length: int, centre: int, size: int) -> slice:
    size = min(size, length)
    start = min(max(centre - size // 2, 0), length - size)
    return slice(start, start + size)


def crop_example(
    images: Sequence[str | Path],
    label: str | Path | None,
    folder: str | Path,
    slice_axis: int | None,
    slices: int = 3,
    case_id: str = "",
) -> dict[str, Any]:
    """Write the cropped channel files ``folder/example/image_XXXX.nii.gz`` and return the example's description.

    Args:
        images: the case's channel files (same grid).
        label: its reference label file, used only to centre the crop on labelled voxels.
        folder: the release folder.
        slice_axis: the RAS axis a 2-D model slices along (after ``Orientationd("RAS")``), ``None`` for 3-D.
        slices: slices kept (2-D), or voxels per axis (3-D).
        case_id: the case's name, recorded in ``example.json``.
    """
    reference = nib.load(str(images[0]))
    shape = reference.shape[:3]
    mask = np.asarray(nib.load(str(label)).dataobj) > 0 if label is not None else np.ones(shape, dtype=bool)
    index: list[slice] = [slice(None)] * 3
    if slice_axis is not None:
        ornt = nib.io_orientation(reference.affine)
        array_axis = int(np.flatnonzero(ornt[:, 0] == slice_axis)[0])
        counts = mask.sum(axis=tuple(a for a in range(3) if a != array_axis))
        index[array_axis] = _window(shape[array_axis], int(np.argmax(counts)), slices)
    else:
        centre = np.argwhere(mask).mean(axis=0).round().astype(int) if mask.any() else np.array(shape) // 2
        index = [_window(shape[a], int(centre[a]), slices) for a in range(3)]
    written = []
    for channel, path in enumerate(images):
        image = nib.load(str(path))
        cropped = image.slicer[tuple(index)]
        name = f"example/image_{channel:04d}.nii.gz"
        with atomic_path(Path(folder) / name) as temporary:
            nib.save(cropped, temporary)
        written.append(name)
    info = {
        "case_id": case_id,
        "inputs": written,
        "expected": EXAMPLE_EXPECTED,
        "crop_voxels": [[s.start or 0, s.stop if s.stop is not None else shape[a]] for a, s in enumerate(index)],
        "source_shape": [int(s) for s in shape],
        "min_dice": MIN_DICE,
    }
    return info


def predict_label_map(loaded: LoadedModel, images: Sequence[str | Path]) -> np.ndarray:
    """The model's integer label map for one case, on the case's native grid, exactly as ``medseg predict`` makes it.

    The case is read with :func:`medseg.data.io.load_case` and predicted by
    :func:`medseg.inference.dense.predict_dense` (the release's preprocessing, slice-wise or sliding-window logits,
    probabilities mapped back through the inverse transforms before the argmax), so ``medseg verify`` checks the very
    code path users run.
    """
    return np.asarray(predict_dense(loaded, load_case([str(p) for p in images])).labels)


def write_expected(loaded: LoadedModel, folder: str | Path, info: Mapping[str, Any]) -> dict[str, Any]:
    """Predict the example with ``loaded``, write ``example/expected_label.nii.gz`` and ``example/example.json``."""
    folder = Path(folder)
    inputs = [folder / name for name in info["inputs"]]
    labels = predict_label_map(loaded, inputs)
    write_label_map(labels, inputs[0], folder / EXAMPLE_EXPECTED)
    info = {**info, "label_voxels": {str(v): int((labels == v).sum()) for v in sorted(loaded.label_names)}}
    atomic_write_json(folder / EXAMPLE_INFO, info)
    return info


def compare_label_maps(predicted: np.ndarray, expected: np.ndarray, labels: Mapping[int, str]) -> dict[str, Any]:
    """Per-label Dice of two label maps and whether they agree (identical, or every Dice >= :data:`MIN_DICE`).

    A foreground label absent from both counts as Dice 1. Returns ``{"identical", "differing_voxels", "dice":
    {name: value}, "min_dice", "passed"}``.
    """
    if predicted.shape != expected.shape:
        return {"identical": False, "differing_voxels": None, "dice": {}, "min_dice": 0.0, "passed": False}
    dice = {}
    for value, name in sorted(labels.items()):
        if value == 0:
            continue
        a, b = predicted == value, expected == value
        total = int(a.sum() + b.sum())
        dice[name] = 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)
    identical = bool(np.array_equal(predicted, expected))
    lowest = min(dice.values(), default=1.0)
    return {
        "identical": identical,
        "differing_voxels": int((predicted != expected).sum()),
        "dice": dice,
        "min_dice": lowest,
        "passed": identical or lowest >= MIN_DICE,
    }


def read_example(folder: str | Path) -> dict[str, Any]:
    """``example/example.json`` of a release (the inputs and expected output, relative to the folder)."""
    return json.loads((Path(folder) / EXAMPLE_INFO).read_text(encoding="utf-8"))
