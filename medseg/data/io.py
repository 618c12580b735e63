"""Reading NIfTI files and DICOM series into channel-first MONAI MetaTensors with their world geometry.

MONAI's readers already agree on one world frame: the ``affine`` of the result maps array indices to RAS+ millimetres,
for NIfTI (nibabel) and for DICOM (pydicom, whose LPS patient frame is converted). This module adds what a user of
whole datasets needs on top: a reader chosen from the path, headers checked before the voxels are read (size,
truncation, geometry, one regular DICOM series), several channel files stacked into one image after checking that
they share a grid, and errors that name the file instead of a traceback from inside a reader.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform

from medseg.data.checks import geometry_difference
from medseg.data.dicom_series import DicomSeries, lenient_dicom_values, scan_file, scan_series
from medseg.data.dicom_slice import one_slice_volume
from medseg.data.headers import read_nifti_header
from medseg.errors import ConfigError, ReaderError

__all__ = [
    "NIFTI_SUFFIXES",
    "LoadCased",
    "check_header",
    "is_dicom_series",
    "load_case",
    "load_image",
    "same_geometry",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")


def is_dicom_series(path: str | os.PathLike[str]) -> bool:
    """A folder holding at least one file that starts with the DICOM preamble (``DICM`` at byte 128)."""
    path = Path(path)
    if not path.is_dir():
        return False
    for child in sorted(path.iterdir()):
        if child.is_file() and child.suffix.lower() in _DICOM_SUFFIXES:
            with open(child, "rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    return True
    return False


def _reader_for(path: Path):
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return NibabelReader()
    if path.is_dir():
        if not is_dicom_series(path):
            raise ReaderError(f"{path} is a folder but holds no DICOM files (files with the 'DICM' preamble).")
        return PydicomReader()
    if name.endswith(".dcm"):
        return PydicomReader()
    raise ReaderError(
        f"{path}: unsupported image format. medseg reads NIfTI (.nii, .nii.gz) files and DICOM series folders; "
        f"convert other formats first (e.g. with SimpleITK: sitk.WriteImage(sitk.ReadImage(src), 'case.nii.gz'))."
    )


def _series_reader(path: Path, series: str | None) -> tuple[PydicomReader, DicomSeries]:
    """A reader restricted to the files of the checked series (MONAI globs ``folder/*`` and matches this regex)."""
    if glob.has_magic(str(path)):
        raise ReaderError(
            f"{path}: the folder name holds one of the characters * ? [ ], which the DICOM reader (MONAI, through "
            f"glob) takes as a pattern. Rename the folder."
        )
    checked = scan_series(path, series)
    prefix = re.escape(os.path.join(str(path), ""))
    names = "|".join(re.escape(f.name) for f in checked.files)
    return PydicomReader(fname_regex=f"{prefix}(?:{names})\\Z"), checked


def _check_read_geometry(path: Path, image: MetaTensor, expected: np.ndarray | None, nifti: bool) -> None:
    """The affine the reader produced must be the one the header states; MONAI may quietly choose another.

    MONAI replaces a NIfTI's sform by its qform when the sform's voxel sizes differ from ``pixdim``, while nibabel,
    ITK-SNAP and the NIfTI standard use the sform: such a file would be placed differently by different tools.
    """
    read = np.asarray(image.affine, dtype=float)
    if expected is None or read.shape != (4, 4):
        return
    difference = geometry_difference(np.asarray(expected, dtype=float), read)
    if not difference:
        return
    if nifti:
        raise ReaderError(
            f"{path}: its sform and its qform/pixdim disagree ({difference}); nibabel uses the sform, MONAI the "
            f"qform, so tools would place the image differently. If the sform is right, make them agree with "
            f"nibabel: img = nib.load(path); img.set_qform(img.affine, code=1); nib.save(img, path)."
        )
    raise ReaderError(
        f"{path}: the stacked series is not where its slice positions say ({difference}). Convert the series with "
        f"dcm2niix and give the NIfTI file instead."
    )


def _checked_reader(path: Path, series: str | None):
    """The reader for ``path``, the affine its header states (``None``: not known) and, for DICOM, the checked series.

    Raises the header checks' errors.
    """
    if not path.exists():
        raise ReaderError(f"{path} does not exist.")
    reader = _reader_for(path)
    if series is not None and not path.is_dir():
        raise ConfigError(
            f"series={series!r} selects a series of a DICOM folder, but {path} is a single file; leave it out."
        )
    if isinstance(reader, NibabelReader):
        return reader, read_nifti_header(path).affine, None
    if path.is_dir():
        reader, checked = _series_reader(path, series)
        return reader, checked.affine, checked
    checked = scan_file(path)
    return reader, checked.affine, checked


def check_header(path: str | os.PathLike[str], *, series: str | None = None) -> None:
    """Every check :func:`load_image` makes before reading voxels, without reading them (headers only).

    Meant for commands that take many inputs (``medseg predict`` on a folder) to refuse a bad one before the heavy
    work on the others starts.

    Raises:
        ReaderError: as :func:`load_image`, except for what only the voxels show (truncated compressed data).
        ConfigError: ``series`` given for a single file, or an invalid ``$MEDSEG_MAX_INPUT_GB``.
    """
    _checked_reader(Path(path), series)


def load_image(path: str | os.PathLike[str], *, series: str | None = None) -> MetaTensor:
    """Read one image file or DICOM series folder as a channel-first MetaTensor.

    The header is checked before any voxel is read (NIfTI: :mod:`medseg.data.headers`; DICOM folders:
    :mod:`medseg.data.dicom_series`), so an input above the memory limit, a truncated file, an unusable geometry or
    a folder that is not one regular series fails in a fraction of a second instead of after the allocation. The
    affine the reader produces is then compared with the one the header states, since MONAI may swap a NIfTI's
    sform for its qform without a word.

    Args:
        path: A NIfTI file, a DICOM file, or a DICOM series folder.
        series: For a DICOM folder holding several series, the one to read: its SeriesInstanceUID, or its unique
            SeriesDescription.

    Returns:
        ``(C, X, Y, Z)`` float tensor whose ``affine`` maps voxel indices to RAS+ world coordinates in mm. A 3D file
        gives one channel; a 4D NIfTI (MSD multi-modal) gives one channel per volume. A single DICOM slice (one file,
        or a one-file series) is the one-slice volume ``(C, X, Y, 1)`` (:mod:`medseg.data.dicom_slice`).

    Raises:
        ReaderError: missing, unreadable or truncated file, unsupported format, an empty array, a declared size
            above ``$MEDSEG_MAX_INPUT_GB``, a broken header geometry, or a DICOM folder that is not one regular
            series (several series, a gap, a duplicate, inconsistent slices).
        ConfigError: ``series`` given for a single file, or an invalid ``$MEDSEG_MAX_INPUT_GB``.
    """
    path = Path(path)
    reader, expected, checked = _checked_reader(path, series)
    try:
        with lenient_dicom_values() if isinstance(reader, PydicomReader) else contextlib.nullcontext():
            image = LoadImage(reader=reader, image_only=True)(str(path))
        image = EnsureChannelFirst()(image)
    except ReaderError:
        raise
    except Exception as err:  # readers raise anything from EOFError to zlib errors on damaged files
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise ReaderError(
            f"{path} cannot be read ({type(err).__name__}: {first}). The file may be truncated or corrupted; "
            f"re-export or re-download it."
        ) from err
    if image.numel() == 0:
        raise ReaderError(f"{path} holds an empty array (shape {tuple(image.shape)}).")
    if checked is not None and checked.slice_affine is not None:  # a single slice: the one-slice volume
        image = one_slice_volume(image, checked.slice_affine, checked.slice_spacing, checked.files[0])
        expected = checked.slice_affine
    _check_read_geometry(path, image, expected, nifti=isinstance(reader, NibabelReader))
    return image


def same_geometry(a: MetaTensor, b: MetaTensor, tolerance: float = 1e-3) -> bool:
    """Whether two images share a voxel grid: same spatial shape and affines equal within ``tolerance`` mm."""
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        return False
    return bool(np.allclose(np.asarray(a.affine), np.asarray(b.affine), atol=tolerance))


def load_case(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> MetaTensor:
    """Read the channel files of one case (``CASE_0000``, ``CASE_0001``...) and stack them as channels.

    Raises:
        ReaderError: a file cannot be read, or the channels do not share one voxel grid (which would silently
            misalign T1 and T2, or CT and PET).
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise ReaderError("no image files given for the case")
    images = [load_image(p) for p in paths]
    first = images[0]
    for path, image in zip(paths[1:], images[1:]):
        if not same_geometry(first, image):
            raise ReaderError(
                f"{path} does not share the voxel grid of {paths[0]} (shape {tuple(image.shape[1:])} vs "
                f"{tuple(first.shape[1:])}, or a different affine). Resample the channels onto one grid first."
            )
    if len(images) == 1:
        return first
    stacked = torch.cat([torch.as_tensor(i) for i in images], dim=0)
    return MetaTensor(stacked, meta=dict(first.meta))


class LoadCased(MapTransform):
    """Dictionary transform that reads ``data[key]`` (a path, or a list of channel paths) with :func:`load_case`.

    It replaces MONAI's ``LoadImaged`` + ``EnsureChannelFirstd`` in medseg pipelines so that training, evaluation
    and inference read files through exactly one code path.
    """

    def __init__(self, keys, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_case(d[key])
        return d
