"""Reading NIfTI files and DICOM series into channel-first MONAI MetaTensors with their world geometry.

MONAI's readers already agree on one world frame: the ``affine`` of the result maps array indices to RAS+ millimetres,
for NIfTI (nibabel) and for DICOM (pydicom, whose LPS patient frame is converted). This module adds what a user of
whole datasets needs on top: a reader chosen from the path, several channel files stacked into one image after
checking that they share a grid, and errors that name the file instead of a traceback from inside a reader.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform

from medseg.errors import ReaderError

__all__ = [
    "NIFTI_SUFFIXES",
    "LoadCased",
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


_PYDICOM_SETTINGS = threading.Lock()


@contextlib.contextmanager
def _lenient_dicom_values():
    """pydicom's value validation as its default (warn), for the duration of one MONAI read.

    MONAI's ``PydicomReader`` appends the mean slice distance, a float of up to 17 digits, to the first slice's
    ``PixelSpacing`` (a DICOM decimal string list, 16 characters at most). pydicom validates that in its global
    *reading* mode, which ``Dataset.to_json_dict`` (MONAI's metadata) switches to "raise" and back without a lock:
    reads in two threads can leave it at "raise" for good, and every later series with an unround slice distance
    then fails to load. The mode is set here, under a lock, and restored after.
    """
    from pydicom import config

    with _PYDICOM_SETTINGS:
        saved = config.settings._reading_validation_mode
        config.settings.reading_validation_mode = config.WARN
        try:
            yield
        finally:
            config.settings._reading_validation_mode = saved


def load_image(path: str | os.PathLike[str]) -> MetaTensor:
    """Read one image file or DICOM series folder as a channel-first MetaTensor.

    Returns:
        ``(C, X, Y, Z)`` float tensor whose ``affine`` maps voxel indices to RAS+ world coordinates in mm. A 3D file
        gives one channel; a 4D NIfTI (MSD multi-modal) gives one channel per volume.

    Raises:
        ReaderError: missing, unreadable or truncated file, unsupported format, or an empty array.
    """
    path = Path(path)
    if not path.exists():
        raise ReaderError(f"{path} does not exist.")
    reader = _reader_for(path)
    try:
        with _lenient_dicom_values() if isinstance(reader, PydicomReader) else contextlib.nullcontext():
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
