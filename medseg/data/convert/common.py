"""What every converter shares: a plan of the cases found in a download, and one writer that carries it out.

Each source format (``msd``, ``btcv``...) only *reads a layout*: it checks the download and returns a
:class:`ConversionPlan` listing every case's files. Checking everything before writing anything means a wrong folder
fails in a second with a message naming the missing file, instead of after an hour of copying. The writer here then
copies or splits the images, remaps the labels, and writes ``dataset.json``, all inside a temporary folder that is
renamed into place at the end (see :func:`medseg.data.prepare.writing.building_dataset`).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.data.formats import write_dataset_json
from medseg.data.prepare.writing import case_paths
from medseg.errors import DatasetError

__all__ = ["CaseSource", "ConversionPlan", "find_folder", "require_file", "write_plan"]


@dataclass(frozen=True)
class CaseSource:
    """One case of the download.

    Attributes:
        case_id: identifier in the converted dataset (``CASE`` in ``CASE_0000.nii.gz``).
        images: one file per channel, in channel order; or one 4D file holding every channel (``split_4d``).
        label: segmentation file, or ``None`` for unlabelled (official test) images.
        test: write to ``imagesTs``/``labelsTs`` instead of ``imagesTr``/``labelsTr``.
        split_4d: ``images`` is a single 4D NIfTI whose last axis is the channel (MSD multi-modal tasks).
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    test: bool = False
    split_4d: bool = False


@dataclass
class ConversionPlan:
    """Everything needed to write a dataset, found and checked before anything is written.

    Attributes:
        name: default dataset name (``DatasetNNN_<name>``).
        channel_names: channel index -> name (``CT`` selects CT normalisation in nnU-Net and medseg).
        labels: label name -> value in the *converted* dataset.
        cases: the cases, training and test.
        label_map: source value -> converted value (e.g. BraTS 4 -> 3); ``None`` keeps values. Source values not
            in the map (or, without a map, not in ``labels``) are an error, never silently dropped.
        extra: more ``dataset.json`` fields (``description``, ``licence``, ``reference``...).
    """

    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    cases: list[CaseSource]
    label_map: dict[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def require_file(path: Path, expected: str) -> Path:
    """``path`` if it is a file, else a :class:`DatasetError` saying what was expected there."""
    if not path.is_file():
        raise DatasetError(f"Missing file {path}: expected {expected}.")
    return path


def find_folder(source: Path, candidates: list[str], expected: str) -> Path:
    """The first of ``source/<candidate>`` that is a folder (``""`` is ``source`` itself), else a DatasetError."""
    if not source.is_dir():
        raise DatasetError(f"{source} is not a folder: expected {expected}.")
    for candidate in candidates:
        folder = source / candidate if candidate else source
        if folder.is_dir():
            return folder
    tried = ", ".join(str(source / c) if c else str(source) for c in candidates)
    raise DatasetError(
        f"No folder for {expected} in {source} (looked for: {tried}). Point SOURCE at the extracted "
        "download; see datasets/README.md for the expected layout."
    )


def _copy_image(source: Path, target: Path) -> None:
    if source.name.endswith(".nii.gz"):
        shutil.copyfile(source, target)  # byte-exact: no resampling, no change of header
    else:
        nib.save(nib.load(source), target)


def _split_channels(source: Path, targets: list[Path]) -> None:
    image = nib.load(source)
    shape = image.shape
    channels = 1 if len(shape) == 3 else (shape[3] if len(shape) == 4 else -1)
    if channels != len(targets):
        raise DatasetError(
            f"{source} has shape {shape}: expected a 4D image with {len(targets)} channels on the last axis "
            f"(one per entry of dataset.json 'modality')."
        )
    if len(shape) == 3:
        _copy_image(source, targets[0])
        return
    header = image.header.copy()
    for channel, target in enumerate(targets):
        data = np.asanyarray(image.dataobj[..., channel])
        nib.save(nib.Nifti1Image(data, image.affine, header), target)


def _write_label(source: Path, target: Path, plan: ConversionPlan) -> None:
    image = nib.load(source)
    data = np.asanyarray(image.dataobj)
    if np.issubdtype(data.dtype, np.floating):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise DatasetError(f"{source}: label values must be integers, found non-integer values.")
        data = rounded
    data = data.astype(np.int64)
    mapping = plan.label_map or {value: value for value in plan.labels.values()}
    values = np.unique(data)
    unknown = sorted(int(v) for v in values if int(v) not in mapping)
    if unknown:
        raise DatasetError(
            f"{source}: label values {unknown} are not among the expected {sorted(mapping)} of this format. "
            "Check that the file is the segmentation of this dataset."
        )
    table = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for old, new in mapping.items():
        table[old] = new
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    nib.save(nib.Nifti1Image(table[data], image.affine, header), target)


def write_plan(plan: ConversionPlan, work: Path, progress: bool = True) -> Path:
    """Write every case of ``plan`` and its ``dataset.json`` into the (temporary) dataset folder ``work``."""
    num_channels = len(plan.channel_names)
    for folder in ("imagesTr", "labelsTr"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    for index, case in enumerate(plan.cases, start=1):
        images, label = case_paths(work, case.case_id, num_channels, test=case.test)
        images[0].parent.mkdir(parents=True, exist_ok=True)
        if case.split_4d:
            _split_channels(case.images[0], images)
        else:
            for source, target in zip(case.images, images, strict=True):
                _copy_image(source, target)
        if case.label is not None:
            label.parent.mkdir(parents=True, exist_ok=True)
            _write_label(case.label, label, plan)
        if progress:
            print(f"\rconverted {index}/{len(plan.cases)} cases", end="", file=sys.stderr, flush=True)
    if progress and plan.cases:
        print(file=sys.stderr)
    num_training = sum(not case.test for case in plan.cases)
    return write_dataset_json(work, plan.channel_names, plan.labels, num_training, ".nii.gz", **plan.extra)
