"""Which image reader nnU-Net must use to see a dataset's cases the way medseg does.

medseg reorients every case to RAS before it measures spacing or trains. nnU-Net's default reader (SimpleITK) keeps
each file's own voxel order, so on a dataset whose cases are stored in different orientations nnU-Net sees other
axes, another median spacing and another patch size than medseg: the two would not train on the same problem.
nnU-Net's ``NibabelIOWithReorient`` reorients to RAS like medseg; ``dataset.json``'s
``overwrite_image_reader_writer`` selects it. It is written only where needed, so all-RAS datasets keep nnU-Net's
default.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib

__all__ = ["READER_KEY", "REORIENTING_READER", "needs_reorienting_reader", "nnunet_reader_fields"]

READER_KEY = "overwrite_image_reader_writer"
REORIENTING_READER = "NibabelIOWithReorient"
_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


def needs_reorienting_reader(root: str | Path, file_ending: str) -> bool:
    """Whether any NIfTI case of the dataset at ``root`` is stored in another orientation than RAS (headers only)."""
    if file_ending not in (".nii.gz", ".nii"):
        return False
    for folder in _FOLDERS:
        for path in sorted((Path(root) / folder).glob(f"*{file_ending}")):
            if nib.aff2axcodes(nib.load(path).affine) != ("R", "A", "S"):
                return True
    return False


def nnunet_reader_fields(root: str | Path, file_ending: str) -> dict[str, str]:
    """The ``dataset.json`` fields that make nnU-Net read the cases as medseg does (empty when its default does)."""
    return {READER_KEY: REORIENTING_READER} if needs_reorienting_reader(root, file_ending) else {}
