"""KiTS23 kidney tumour CT (``github.com/neheller/kits23`` after ``kits23_download_data``).

Expected layout: ``dataset/case_00000/{imaging.nii.gz, segmentation.nii.gz}``; ``SOURCE`` may be the repository
(holding ``dataset/``) or ``dataset`` itself. The repository ships the segmentations; the images are fetched by its
download script, so a case folder without ``imaging.nii.gz`` is reported with that hint.

Labels are written as in the files: kidney 1, tumor 2, cyst 3. KiTS23 *evaluates* nested regions (kidney + masses,
masses = tumor + cyst, tumor), as nnU-Net's KiTS23 conversion does with region-based training; medseg keeps the plain
labels, and the regions can be scored from them.
"""

from __future__ import annotations

from pathlib import Path

from medseg.data.convert.common import CaseSource, ConversionPlan, find_folder
from medseg.errors import DatasetError

__all__ = ["LABELS", "plan"]

LABELS = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}


def plan(source: Path) -> ConversionPlan:
    """Read and check a KiTS23 ``dataset`` folder."""
    folder = find_folder(source, ["dataset", ""], "KiTS23's dataset/ folder of case_XXXXX/ cases")
    case_folders = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("case_"))
    if not case_folders:
        raise DatasetError(f"No case_XXXXX folders in {folder}: expected KiTS23's dataset/case_00000/ ...")
    cases = []
    for case in case_folders:
        image, label = case / "imaging.nii.gz", case / "segmentation.nii.gz"
        if not image.is_file():
            raise DatasetError(
                f"Missing file {image}: expected the case's CT. The kits23 repository ships only the "
                "segmentations; fetch the images with its `kits23_download_data` command first."
            )
        if not label.is_file():
            raise DatasetError(f"Missing file {label}: expected the case's segmentation (kidney 1, tumor 2, cyst 3).")
        cases.append(CaseSource(case.name, (image,), label))
    extra = {
        "description": "KiTS23 kidney, tumor and cyst segmentation in contrast-enhanced CT; see datasets/kits.md",
        "reference": "https://kits-challenge.org/kits23/",
        "licence": "CC BY-NC-SA 4.0",
    }
    return ConversionPlan("KiTS23", {0: "CT"}, dict(LABELS), cases, extra=extra)
