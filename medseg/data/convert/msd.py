"""Medical Segmentation Decathlon (``TaskXX_Name``) -> nnU-Net v2, like ``nnUNetv2_convert_MSD_dataset``.

An MSD task folder holds ``dataset.json`` (``modality``, ``labels`` as value -> name, ``training`` and ``test``
lists), ``imagesTr``, ``labelsTr`` and ``imagesTs``. Multi-modal tasks (BrainTumour: FLAIR, T1w, t1gd, T2w;
Prostate: T2, ADC) store one 4D file per case; it is split into ``CASE_0000`` ... ``CASE_000N`` in the order of
``modality``. The ``._*`` files of macOS archives are ignored because only the files listed in ``dataset.json`` are
read. MSD test images have no labels; they go to ``imagesTs`` without ``labelsTs``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from medseg.data.convert.common import CaseSource, ConversionPlan, require_file
from medseg.errors import DatasetError

__all__ = ["plan"]


def _case_id(entry: str) -> str:
    name = Path(entry).name
    for ending in (".nii.gz", ".nii"):
        if name.endswith(ending):
            return name[: -len(ending)]
    raise DatasetError(f"MSD dataset.json lists {entry!r}: expected a .nii.gz or .nii file.")


def _resolve(source: Path, entry: str, expected: str) -> Path:
    return require_file(source / entry.removeprefix("./"), expected)


def plan(source: Path) -> ConversionPlan:
    """Read and check an MSD task folder (``Task01_BrainTumour`` ...)."""
    meta_path = require_file(source / "dataset.json", "the MSD dataset.json of a TaskXX_Name folder")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{meta_path} is not valid JSON ({err}).") from err
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise DatasetError(
                f"{meta_path} has no '{key}' field: expected an MSD dataset.json (modality, labels, training, test)."
            )
    try:
        channel_names = {int(k): str(v) for k, v in sorted(meta["modality"].items(), key=lambda kv: int(kv[0]))}
        labels = {str(v): int(k) for k, v in meta["labels"].items()}
    except (AttributeError, ValueError) as err:
        raise DatasetError(f"{meta_path}: 'modality' and 'labels' must map integer keys to names ({err}).") from err
    if 0 in labels.values():
        labels = {("background" if value == 0 else name): value for name, value in labels.items()}
    multi = len(channel_names) > 1
    cases = []
    for entry in meta["training"]:
        image = _resolve(source, entry["image"], f"the training image listed in {meta_path.name}")
        label = _resolve(source, entry["label"], f"the training label listed in {meta_path.name}")
        cases.append(CaseSource(_case_id(entry["image"]), (image,), label, split_4d=multi))
    for entry in meta.get("test", []):
        entry = entry["image"] if isinstance(entry, dict) else entry
        image = _resolve(source, entry, f"the test image listed in {meta_path.name}")
        cases.append(CaseSource(_case_id(entry), (image,), None, test=True, split_4d=multi))
    match = re.fullmatch(r"Task\d+_(.+)", source.name)
    name = match.group(1) if match else str(meta.get("name", source.name))
    extra = {k: meta[k] for k in ("description", "reference", "licence", "release") if k in meta}
    extra["name"] = str(meta.get("name", name))
    return ConversionPlan(re.sub(r"[^A-Za-z0-9_-]", "", name), channel_names, labels, cases, extra=extra)
