"""One DICOM slice placed in the world: its in-plane affine, and a single slice read as a one-slice volume.

MONAI's ``PydicomReader`` reads a single-frame file (a one-file series, or one ``.dcm`` file) as a 2-D image
``(columns, rows)``. Its affine gets the in-plane axes and the origin right but pads the slice axis with the identity
column ``(0, 0, 1)``: a slice thickness of 1 mm whatever the header says, and a singular matrix for a sagittal or
coronal slice (whose in-plane axes already span z). medseg's readers and models take volumes, so a single slice is
made the one-slice volume ``(columns, rows, 1)`` whose third affine column is

* the slice normal, row direction x column direction of ImageOrientationPatient (the DICOM convention, as ITK and
  dcm2niix take it), times
* SpacingBetweenSlices where the header gives it (what ITK uses, and the distance to a neighbour slice), else
  SliceThickness (the extent the slice covers), else 1 mm with a warning, since no tag says more.

For an axial slice with SpacingBetweenSlices this is exactly SimpleITK's geometry; ITK ignores SliceThickness and takes
1 mm when SpacingBetweenSlices is absent, which medseg does not, since the thickness is the better guess.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.errors import ReaderError

__all__ = ["ASSUMED_SPACING", "RAS_FROM_LPS", "in_plane_affine", "one_slice_volume", "slice_affine"]

_log = logging.getLogger(__name__)

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
ASSUMED_SPACING = "assumed 1 mm"  # the slice-spacing source when neither tag is present
_PLACEMENT_TOLERANCE = 1e-3  # of the smaller pixel spacing


def in_plane_affine(position: np.ndarray, orientation: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Voxel-to-LPS affine of a slice's array axes (columns, rows), origin at its first pixel, slice axis zero.

    Args:
        position: ImagePositionPatient (3,) in mm.
        orientation: ImageOrientationPatient (6,): row direction, then column direction.
        spacing: PixelSpacing (2,): between rows, then between columns, in mm.
    """
    between_rows, between_columns = spacing
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(orientation[:3], dtype=float) * between_columns
    affine[:3, 1] = np.asarray(orientation[3:], dtype=float) * between_rows
    affine[:3, 2] = 0.0
    affine[:3, 3] = position
    return affine


def slice_affine(
    position: np.ndarray | None,
    orientation: np.ndarray | None,
    spacing: np.ndarray | None,
    between: float | None,
    thickness: float | None,
) -> tuple[np.ndarray | None, str | None]:
    """The voxel-to-RAS+ affine of a single slice as a one-slice volume, and where its slice spacing comes from.

    Args:
        position, orientation, spacing: as :func:`in_plane_affine`; ``None`` when the tag is missing.
        between: SpacingBetweenSlices in mm, ``None`` when absent.
        thickness: SliceThickness in mm, ``None`` when absent.

    Returns:
        ``(affine, source)``, ``source`` being ``"SpacingBetweenSlices"``, ``"SliceThickness"`` or
        :data:`ASSUMED_SPACING`; ``(None, None)`` when a geometry tag is missing or not finite, a pixel spacing is
        not positive, or the row and column directions are parallel: such a slice has no place in the world.
    """
    geometry = (position, orientation, spacing)
    if any(v is None or not np.all(np.isfinite(v)) for v in geometry) or np.any(np.asarray(spacing) <= 0):
        return None, None
    normal = np.cross(orientation[:3], orientation[3:])
    if np.linalg.norm(normal) < 0.5:  # directions far from perpendicular: no plane to speak of
        return None, None
    if between is not None:
        distance, source = between, "SpacingBetweenSlices"
    elif thickness is not None:
        distance, source = thickness, "SliceThickness"
    else:
        distance, source = 1.0, ASSUMED_SPACING
    affine = in_plane_affine(position, orientation, spacing)
    affine[:3, 2] = normal / np.linalg.norm(normal) * distance
    return RAS_FROM_LPS @ affine, source


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def one_slice_volume(
    image: MetaTensor,
    affine: np.ndarray | None,
    spacing_source: str | None,
    path: str | os.PathLike[str],
) -> MetaTensor:
    """MONAI's 2-D read ``(C, columns, rows)`` of a single slice as the one-slice volume ``(C, columns, rows, 1)``.

    The in-plane axes and origin of MONAI's affine are checked against the header's, then the affine becomes the
    header's, with the slice normal as third axis (module docstring). A 3-D image, or one whose header gave no
    affine (``affine`` ``None``: a multi-frame file, a slice without geometry tags), is returned unchanged.

    Args:
        image: What MONAI's ``PydicomReader`` read, channel first.
        affine: :attr:`medseg.data.dicom_series.DicomSeries.affine` of the slice.
        spacing_source: :attr:`medseg.data.dicom_series.DicomSeries.slice_spacing`; a warning names the file when
            it is :data:`ASSUMED_SPACING`.
        path: The file, for messages.

    Raises:
        ReaderError: MONAI read another number of pixels, or placed an axis or the origin elsewhere than the header.
    """
    if affine is None or image.ndim != 3:
        return image
    path = Path(path)
    expected = np.asarray(affine, dtype=float)
    scale = np.linalg.norm(expected[:3, :2], axis=0)
    read = np.asarray(image.affine, dtype=float)
    for column, name in ((0, "row direction"), (1, "column direction"), (3, "first pixel")):
        if read.shape != (4, 4) or np.linalg.norm(read[:3, column] - expected[:3, column]) > (
            _PLACEMENT_TOLERANCE * float(scale.min())
        ):
            found = _fmt(read[:3, column]) if read.shape == (4, 4) else f"an affine of shape {read.shape}"
            raise ReaderError(
                f"{path}: the DICOM reader placed the slice's {name} at {found}, but its header implies "
                f"{_fmt(expected[:3, column])} (RAS mm). Convert the file with dcm2niix and give the NIfTI instead."
            )
    if spacing_source == ASSUMED_SPACING:
        _log.warning(
            "%s: a single slice with neither SpacingBetweenSlices nor SliceThickness; its thickness is taken as 1 mm. "
            "Set SliceThickness in the file if resampling or a spacing-based step depends on it.",
            path,
        )
    volume = image.unsqueeze(-1)
    volume.affine = torch.as_tensor(expected, dtype=torch.float64)
    volume.meta["original_affine"] = torch.as_tensor(expected, dtype=torch.float64)
    volume.meta["spatial_shape"] = np.asarray(volume.shape[1:])
    return volume
