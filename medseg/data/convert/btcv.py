"""BTCV / Synapse multi-organ abdominal CT (MICCAI 2015 "Multi-Atlas Labeling Beyond the Cranial Vault").

Expected layout (``RawData.zip`` extracted)::

    RawData/Training/img/img0001.nii.gz      RawData/Training/label/label0001.nii.gz
    RawData/Testing/img/img0061.nii.gz       (no labels: official test set)

``SOURCE`` may be the folder holding ``RawData``, ``RawData`` itself, or ``Training``. Cases become ``BTCV_0001``;
training cases go to ``imagesTr``/``labelsTr``, the unlabelled official test images (if present) to ``imagesTs``.
"""

from __future__ import annotations

import re
from pathlib import Path

from medseg.data.convert.common import CaseSource, ConversionPlan, find_folder, require_file
from medseg.errors import DatasetError

__all__ = ["LABELS", "plan"]

LABELS = {
    "background": 0,
    "spleen": 1,
    "right_kidney": 2,
    "left_kidney": 3,
    "gallbladder": 4,
    "esophagus": 5,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
    "inferior_vena_cava": 9,
    "portal_and_splenic_vein": 10,
    "pancreas": 11,
    "right_adrenal_gland": 12,
    "left_adrenal_gland": 13,
}


def _images(folder: Path) -> list[tuple[str, Path]]:
    found = []
    for path in sorted(folder.glob("img*.nii*")):
        match = re.fullmatch(r"img(\d+)\.nii(\.gz)?", path.name)
        if match:
            found.append((match.group(1), path))
    return found


def plan(source: Path) -> ConversionPlan:
    """Read and check a BTCV ``RawData`` download."""
    candidates = [source / "RawData" / "Training", source / "Training", source]
    training = next((folder for folder in candidates if (folder / "img").is_dir()), None)
    if training is None:
        raise DatasetError(
            f"No BTCV training images in {source}: expected {source}/RawData/Training/img/img0001.nii.gz (the "
            "extracted RawData.zip), or SOURCE pointing at RawData or Training."
        )
    image_folder = training / "img"
    label_folder = find_folder(training, ["label"], "the training labels (label/label0001.nii.gz ...)")
    cases = []
    for number, image in _images(image_folder):
        ending = ".nii.gz" if image.name.endswith(".nii.gz") else ".nii"
        label = require_file(label_folder / f"label{number}{ending}", f"the label of {image.name}")
        cases.append(CaseSource(f"BTCV_{number}", (image,), label))
    if not cases:
        raise DatasetError(f"No img*.nii.gz files in {image_folder}: expected img0001.nii.gz ... (BTCV RawData).")
    testing = training.parent / "Testing" / "img"
    if testing.is_dir():
        cases += [CaseSource(f"BTCV_{number}", (image,), None, test=True) for number, image in _images(testing)]
    extra = {
        "description": "BTCV (Synapse) multi-organ abdominal CT, 13 organs; see datasets/btcv.md",
        "reference": "https://www.synapse.org/#!Synapse:syn3193805",
        "licence": "Synapse data use terms (registration required); see datasets/btcv.md",
    }
    return ConversionPlan("BTCV", {0: "CT"}, dict(LABELS), cases, extra=extra)
