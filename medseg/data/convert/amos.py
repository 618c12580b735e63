"""AMOS22 abdominal multi-organ CT and MRI (``amos22`` folder of the official release).

Expected layout: ``dataset.json`` (MSD-like: ``labels`` value -> name), ``imagesTr``/``labelsTr`` (training),
``imagesVa``/``labelsVa`` (validation, labelled) and ``imagesTs`` (test, unlabelled). AMOS numbers its scans so that
``amos_0001`` ... ``amos_0499`` are CT and ``amos_0500`` and above are MRI (check the official page); one nnU-Net
dataset should hold one modality, because the intensity normalisation differs, so ``modality`` chooses ``"ct"``
(default) or ``"mri"``. The labelled validation cases become the held-out ``imagesTs``/``labelsTs`` (the official
test labels are not public, so its test images are not converted).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from medseg.data.convert.common import CaseSource, ConversionPlan, find_folder, require_file
from medseg.errors import ConfigError, DatasetError

__all__ = ["MRI_FIRST_ID", "plan"]

MRI_FIRST_ID = 500


def _cases(images: Path, labels: Path, modality: str, test: bool) -> list[CaseSource]:
    cases = []
    for image in sorted(images.glob("amos_*.nii.gz")):
        match = re.fullmatch(r"amos_(\d+)\.nii\.gz", image.name)
        if not match or (int(match.group(1)) >= MRI_FIRST_ID) != (modality == "mri"):
            continue
        label = require_file(labels / image.name, f"the label of {image.name} in {labels.name}/")
        cases.append(CaseSource(image.name[: -len(".nii.gz")], (image,), label, test=test))
    return cases


def plan(source: Path, modality: str = "ct") -> ConversionPlan:
    """Read and check an AMOS22 folder, keeping the cases of one ``modality`` (``"ct"`` or ``"mri"``)."""
    modality = modality.lower()
    if modality not in ("ct", "mri"):
        raise ConfigError(f"AMOS modality must be 'ct' or 'mri', got {modality!r}.")
    folder = find_folder(source, ["amos22", ""], "the AMOS22 folder (dataset.json, imagesTr, labelsTr, imagesVa)")
    meta_path = require_file(folder / "dataset.json", "AMOS22's dataset.json (labels)")
    try:
        meta = json.loads(meta_path.read_text())
        labels = {str(name).strip().lower().replace(" ", "_"): int(value) for value, name in meta["labels"].items()}
    except (json.JSONDecodeError, KeyError, AttributeError, ValueError) as err:
        raise DatasetError(
            f"{meta_path}: expected AMOS22's dataset.json with 'labels' {{value: name}} ({err})."
        ) from err
    labels = {("background" if value == 0 else name): value for name, value in labels.items()}
    train = find_folder(folder, ["imagesTr"], "imagesTr/ (training images)")
    cases = _cases(train, find_folder(folder, ["labelsTr"], "labelsTr/ (training labels)"), modality, False)
    if (folder / "imagesVa").is_dir():
        cases += _cases(folder / "imagesVa", find_folder(folder, ["labelsVa"], "labelsVa/"), modality, True)
    if not any(not case.test for case in cases):
        raise DatasetError(f"No {modality.upper()} training cases (amos_XXXX.nii.gz) in {train}.")
    extra = {
        "description": f"AMOS22 abdominal multi-organ {modality.upper()} (15 organs); validation cases as test "
        "split; see datasets/amos.md",
        "reference": "https://amos22.grand-challenge.org/",
        "licence": "CC BY 4.0",
    }
    channel = {0: "CT" if modality == "ct" else "MRI"}
    return ConversionPlan(f"AMOS{modality.upper()}", channel, labels, cases, extra=extra)
