"""NIfTI headers checked before any voxel is read: declared size, truncation, and a geometry that means something.

Every reader of medseg (:func:`medseg.data.io.load_image` for training and prediction, the validator's
:func:`medseg.data.checks.open_image`) opens a NIfTI file through :func:`read_nifti_header`, so a bad header fails
in a fraction of a second with one line naming the file and the fix, instead of gigabytes later or, worse, not at
all. What it refuses:

* a declared volume above the memory limit (:mod:`medseg.data.memory`);
* a file too short for the voxels it declares: exact for ``.nii``; for ``.nii.gz`` against deflate's largest
  possible compression ratio (1032:1), so a header-only file is caught without decompressing anything;
* NaN, infinite, zero or negative voxel sizes (``pixdim``) on the spatial axes;
* an sform (``sform_code > 0``) with NaN/Inf or a zero/singular matrix. nibabel would use it as is, while MONAI
  quietly swaps in the qform: readers would disagree, and the output header would carry the broken sform on.
  The fix is to write a valid sform, or to set ``sform_code`` to 0 so that the qform is used by everyone;
* a qform (``qform_code > 0``) with NaN/Inf quaternion or offsets, or an impossible quaternion.

When both codes are 0 the voxel sizes alone place the image (NIfTI "method 1"); which transform is used is logged
at debug level.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from medseg.data.memory import ENV_MAX_INPUT_GB, GB, input_limit_bytes, volume_bytes
from medseg.errors import ReaderError

__all__ = ["HeaderError", "check_declared_size", "read_nifti_header", "singular"]

_log = logging.getLogger(__name__)

# Deflate cannot compress better than 1032:1 (a 258-byte match coded in 2 bits); the slack covers gzip framing.
_MAX_DEFLATE_RATIO = 1032
_GZIP_SLACK_BYTES = 4096


class HeaderError(ReaderError):
    """An image header that cannot be used, with what is wrong and the fix kept apart for the dataset validator.

    Attributes:
        path: The file.
        problem: What is wrong, without the file name.
        fix: What the user should do.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}.")


def check_declared_size(path: str | os.PathLike[str], shape: Sequence[int], dtype: np.dtype | str) -> int:
    """Refuse an input whose declared shape and data type would need more memory than the limit allows.

    Args:
        path: The file or DICOM folder, named in the message.
        shape: The declared shape (all axes, channels and frames included).
        dtype: The declared (on-disk) data type.

    Returns:
        The bytes the volume will take in memory.

    Raises:
        HeaderError: the declared size is above the limit; the message gives the shape, type and size, and how to
            raise the limit.
        ConfigError: ``$MEDSEG_MAX_INPUT_GB`` is not a positive number.
    """
    dtype = np.dtype(dtype)
    needed = volume_bytes(shape, dtype.itemsize)
    limit, source = input_limit_bytes()
    if needed > limit:
        suggestion = max(1, math.ceil(needed / GB * 1.5))
        raise HeaderError(
            path,
            f"declares shape {tuple(int(s) for s in shape)} of {dtype.name}, {needed / GB:.1f} GB in memory, above "
            f"the input limit of {limit / GB:.1f} GB ({source})",
            f"if the scan is genuine and the machine has the memory, raise the limit, e.g. "
            f"`export {ENV_MAX_INPUT_GB}={suggestion}`; otherwise its header is damaged: re-export the file",
        )
    return needed


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def singular(matrix: np.ndarray, tolerance: float = 1e-6) -> bool:
    """Whether a 3x3 linear part maps voxels onto a plane or less: a zero column, or columns (nearly) dependent.

    The determinant is compared to the product of the column lengths, so the test does not depend on voxel size.
    """
    matrix = np.asarray(matrix, dtype=float)[:3, :3]
    lengths = np.linalg.norm(matrix, axis=0)
    if not np.all(lengths > 0):
        return True
    return abs(float(np.linalg.det(matrix))) <= tolerance * float(np.prod(lengths))


def _check_size(path: Path, image: nib.spatialimages.SpatialImage) -> None:
    header = image.header
    shape = tuple(int(s) for s in header.get_data_shape())
    dtype = header.get_data_dtype()
    check_declared_size(path, shape, dtype)
    declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    offset = int(header.get_data_offset()) if hasattr(header, "get_data_offset") else 0
    size = path.stat().st_size
    fix = "re-export or re-download the file (it is truncated, or its header declares the wrong shape)"
    if str(path).lower().endswith(".gz"):
        if size * _MAX_DEFLATE_RATIO + _GZIP_SLACK_BYTES < offset + declared:
            raise HeaderError(
                path,
                f"the header declares shape {shape} of {dtype.name} ({declared / 1e9:.3g} GB), but the compressed "
                f"file has only {size} bytes, too few to hold it at any compression ratio",
                fix,
            )
    elif size < offset + declared:
        raise HeaderError(
            path,
            f"the header declares shape {shape} of {dtype.name} ({offset + declared} bytes with the header), but "
            f"the file has only {size} bytes",
            fix,
        )


def _check_geometry(path: Path, header) -> None:
    ndim = int(header["dim"][0])
    spatial = max(1, min(ndim, 3))
    pixdim = np.asarray(header["pixdim"][1 : 1 + spatial], dtype=float)
    fix_pixdim = "write the voxel sizes in mm with nibabel: img.header.set_zooms((sx, sy, sz)), then save it"
    if not np.all(np.isfinite(pixdim)):
        raise HeaderError(path, f"voxel sizes pixdim[1:{1 + spatial}] = {_fmt(pixdim)} hold NaN or Inf", fix_pixdim)
    if not np.all(pixdim > 0):
        raise HeaderError(
            path, f"voxel sizes pixdim[1:{1 + spatial}] = {_fmt(pixdim)} hold a zero or negative size", fix_pixdim
        )
    if "sform_code" not in header:  # an Analyze header: no sform/qform, nibabel scales by pixdim
        return
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    if sform_code > 0:
        sform = np.asarray(header.get_sform(), dtype=float)
        fix = (
            "write the right voxel-to-world matrix with nibabel: img.set_sform(affine, code=1); or, if the qform "
            "is right, drop the sform with img.set_sform(None, code=0)"
        )
        if not np.all(np.isfinite(sform)):
            raise HeaderError(path, f"the sform (srow_x/y/z, sform_code {sform_code}) holds NaN or Inf", fix)
        if singular(sform):
            raise HeaderError(
                path,
                f"the sform (sform_code {sform_code}) is zero or singular (columns {_fmt(sform[:3, :3].T.ravel())}), "
                f"so it places no volume in the world",
                fix,
            )
    if qform_code > 0:
        fix = (
            "write the right transform with nibabel: img.set_qform(affine, code=1); or, if the sform is right, "
            "drop the qform with img.set_qform(None, code=0)"
        )
        quaternion = np.asarray([header["quatern_b"], header["quatern_c"], header["quatern_d"]], dtype=float)
        offsets = np.asarray([header["qoffset_x"], header["qoffset_y"], header["qoffset_z"]], dtype=float)
        if not (np.all(np.isfinite(quaternion)) and np.all(np.isfinite(offsets))):
            raise HeaderError(
                path, f"the qform (quatern_b/c/d, qoffset_x/y/z, qform_code {qform_code}) holds NaN or Inf", fix
            )
        if float(np.sum(quaternion**2)) > 1 + 1e-5:
            raise HeaderError(
                path, f"the qform quaternion {_fmt(quaternion)} is not a rotation (b^2 + c^2 + d^2 > 1)", fix
            )
    used = "sform" if sform_code > 0 else "qform" if qform_code > 0 else "pixdim scaling (no sform or qform)"
    _log.debug("%s: placed in the world by its %s", path, used)


def _stored_header(path: Path, image: nib.spatialimages.SpatialImage):
    """The header as stored: nibabel's load quietly replaces zero voxel sizes by 1 and negative ones by their size."""
    try:
        with ImageOpener(str(path)) as handle:
            return type(image.header).from_fileobj(handle, check=False)
    except Exception:  # nibabel read it once already; keep its (repaired) header rather than fail here
        return image.header


def read_nifti_header(path: str | os.PathLike[str]) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file lazily (header only) and refuse it if its size or geometry cannot be used.

    Returns:
        The nibabel image; voxel data is read only when ``dataobj`` is accessed.

    Raises:
        HeaderError: unreadable header, truncated file, NaN/Inf/zero pixdim, broken sform or qform.
        ReaderError: the declared volume is above the memory limit (``$MEDSEG_MAX_INPUT_GB``).
    """
    path = Path(path)
    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises anything from ImageFileError to EOFError and zlib errors
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise HeaderError(
            path,
            f"the header cannot be read ({type(err).__name__}: {first})",
            "re-export or re-download the file (it is truncated, corrupted or not a NIfTI image)",
        ) from err
    _check_size(path, image)
    _check_geometry(path, _stored_header(path, image))
    return image
