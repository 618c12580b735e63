"""Writing a volume as a DICOM series, so the same scan can be checked as NIfTI and as DICOM.

Reading DICOM goes through MONAI (:mod:`medseg.data.io`); writing is only needed to produce test data and to hand
results to DICOM-only viewers, and SimpleITK's series writer does it with the geometry tags set from the affine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = ["RAS_TO_LPS", "write_dicom_series"]

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_dicom_series(
    array: np.ndarray,
    affine_ras: np.ndarray,
    folder: str | os.PathLike[str],
    modality: str = "CT",
    series_description: str = "medseg",
) -> Path:
    """Write a 3D array as one DICOM file per slice along its last axis.

    Args:
        array: ``(X, Y, Z)`` intensities; rounded to int16 (HU for CT).
        affine_ras: 4x4 voxel-to-RAS+ mm affine of ``array`` (a NIfTI affine). It is converted to DICOM's LPS
            patient frame, so a reader that converts back gets the same world coordinates.
        folder: created if needed; must not already hold DICOM files of another series.
        modality: DICOM Modality (0008,0060).

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    affine_lps = RAS_TO_LPS @ np.asarray(affine_ras, dtype=float)
    columns = affine_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing
    image = sitk.GetImageFromArray(np.round(np.asarray(array)).astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine_lps[:3, 3].tolist())
    image.SetDirection(direction.flatten().tolist())

    stamp = f"{time.time():.6f}".replace(".", "")
    series_uid = f"1.2.826.0.1.3680043.2.1125.{stamp}"
    orientation = "\\".join(f"{v:.10f}" for v in [*direction[:, 0], *direction[:, 1]])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality,
            "0008|103e": series_description,
            "0020|000d": series_uid + ".1",
            "0020|000e": series_uid,
            "0020|0052": series_uid + ".2",  # FrameOfReferenceUID: one world frame for the series (DICOM SEG needs it)
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0020|0037": orientation,
            "0028|0030": f"{spacing[1]:.10f}\\{spacing[0]:.10f}",  # row spacing (along j), column spacing (along i)
            "0018|0050": f"{spacing[2]:.10f}",
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
        writer.Execute(slice_)
    return folder
