"""Per-file and per-case checks of the dataset validator, each turning what is wrong into a :class:`Problem`.

Split from :mod:`medseg.data.validate` (which walks the folders and dataset.json) by concept: this module knows
about one case's files, their headers and voxels, and nothing about the dataset layout. It never raises for a bad
file; see :mod:`medseg.data.validate` for the tolerances and the dimensionality rules. Files are opened through the
header checks of :mod:`medseg.data.headers`, the same that ``medseg predict`` and training make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.headers import HeaderError, check_declared_size, read_nifti_header

__all__ = ["CheckOptions", "Problem", "check_case", "geometry_difference", "open_image"]

_READ_FIX = "re-export or re-download the file (it is truncated, corrupted or not an image), or remove the case"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset.

    Attributes:
        path: The file at fault (or ``dataset.json``, or a folder).
        message: What is wrong.
        fix: What the user should do.
    """

    path: Path
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}. Fix: {self.fix}"


def open_image(path: Path) -> nib.spatialimages.SpatialImage:
    """Open an image with nibabel conventions (``.affine`` maps voxel indices to RAS+ mm), its header checked first.

    NIfTI files are opened lazily (header only, data read on access) through
    :func:`medseg.data.headers.read_nifti_header`, the header checks every medseg reader makes: declared size
    against the memory limit, truncation, NaN/zero voxel sizes, a broken sform or qform. Other formats are read with
    SimpleITK, after their header's size is checked; their LPS geometry is converted to RAS and their (z, y, x)
    array transposed to nibabel's (x, y, z) order.

    Raises:
        HeaderError: the header is unusable (see :mod:`medseg.data.headers`).
    """
    if str(path).endswith((".nii", ".nii.gz")):
        return read_nifti_header(path)
    import SimpleITK as sitk  # lazy: SimpleITK is heavy and only non-NIfTI images need it

    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    info.ReadImageInformation()
    components = info.GetNumberOfComponents()
    probe = sitk.Image([1] * info.GetDimension(), info.GetPixelID(), components)  # one voxel: the numpy dtype
    shape = tuple(info.GetSize()) + ((components,) if components > 1 else ())
    check_declared_size(path, shape, sitk.GetArrayViewFromImage(probe).dtype)
    image = sitk.ReadImage(str(path))
    dim = image.GetDimension()
    array = sitk.GetArrayFromImage(image)
    spatial = tuple(range(dim - 1, -1, -1))
    array = np.transpose(array, spatial + tuple(range(dim, array.ndim)))
    affine = np.eye(4)
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)[:3, :3]
    n = direction.shape[0]
    affine[:n, :n] = direction * np.asarray(image.GetSpacing())[:n]
    affine[:n, 3] = np.asarray(image.GetOrigin())[:n]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return nib.Nifti1Image(array, affine)


def _decompose(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    matrix = np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    direction = matrix / np.where(spacing > 0, spacing, 1.0)
    return spacing, direction, np.asarray(affine, dtype=float)[:3, 3]


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def geometry_difference(a: np.ndarray, b: np.ndarray, tolerance: float = 1e-3) -> str | None:
    """How two voxel-to-world affines differ beyond ``tolerance`` (relative to voxel size), or ``None``.

    Spacings may differ by ``tolerance * spacing``, origins by ``tolerance * smallest spacing`` (mm), direction
    cosines by ``tolerance``.
    """
    spacing_a, direction_a, origin_a = _decompose(a)
    spacing_b, direction_b, origin_b = _decompose(b)
    differences = []
    if np.any(np.abs(spacing_a - spacing_b) > tolerance * np.maximum(spacing_a, spacing_b)):
        differences.append(f"spacing {_fmt(spacing_a)} vs {_fmt(spacing_b)} mm")
    if np.linalg.norm(origin_a - origin_b) > tolerance * max(min(spacing_a.min(), spacing_b.min()), 1e-6):
        differences.append(f"origin {_fmt(origin_a)} vs {_fmt(origin_b)} mm")
    if np.any(np.abs(direction_a - direction_b) > tolerance):
        differences.append(f"direction {_fmt(direction_a.ravel())} vs {_fmt(direction_b.ravel())}")
    return "; ".join(differences) or None


@dataclass(frozen=True)
class CheckOptions:
    """What the per-file checks need to know about the dataset and the user's tolerances."""

    spacing_range_mm: tuple[float, float]
    affine_tolerance: float
    check_voxels: bool
    label_values: frozenset[int]
    num_channels: int
    layout: str


@dataclass(frozen=True)
class _Volume:
    path: Path
    shape: tuple[int, ...]  # spatial (3D)
    affine: np.ndarray


def _open_checked(path: Path, role: str, opts: CheckOptions, problems: list[Problem]) -> _Volume | None:
    """Open one file and check what it holds by itself; ``None`` when it is unusable for comparisons."""
    try:
        image = open_image(path)
        shape = tuple(int(s) for s in image.shape)
        affine = np.asarray(image.affine, dtype=float)
    except HeaderError as err:  # size, truncation or geometry, found from the header before any voxel is read
        problems.append(Problem(path, err.problem, err.fix))
        return None
    except Exception as err:  # any reader failure is a problem of the file, never a crash of the validator
        problems.append(Problem(path, f"cannot be read ({type(err).__name__}: {err})", _READ_FIX))
        return None
    allowed_4d = role == "image" and opts.layout == "msd" and opts.num_channels > 1
    if allowed_4d and not (len(shape) == 4 and shape[3] == opts.num_channels):
        problems.append(
            Problem(
                path,
                f"MSD multi-modal image has shape {shape}; expected 4D with {opts.num_channels} channels last",
                "store the case's channels in one 4D file (X, Y, Z, C) in the order of dataset.json 'modality'",
            )
        )
        return None
    if not allowed_4d and len(shape) != 3:
        fix = "save it as a 3D volume (X, Y, Z); a 2D slice as (X, Y, 1)"
        if role == "image" and len(shape) == 4:
            fix = "split its channels into separate files CASE_0000, CASE_0001... (one 3D volume each)"
        problems.append(Problem(path, f"{role} has {len(shape)} dimensions (shape {shape}); expected 3D", fix))
        return None
    spatial = shape[:3]
    if role == "image":
        _check_spacing(path, spatial, affine, opts, problems)
    if opts.check_voxels:
        try:
            data = np.asanyarray(image.dataobj)
        except Exception as err:
            problems.append(Problem(path, f"voxel data cannot be read ({type(err).__name__}: {err})", _READ_FIX))
            return None
        if role == "image":
            _check_finite(path, data, problems)
        else:
            _check_label_values(path, data, opts, problems)
    return _Volume(path, spatial, affine)


def _check_spacing(path: Path, shape: Sequence[int], affine: np.ndarray, opts: CheckOptions, problems: list[Problem]):
    spacing, _, _ = _decompose(affine)
    low, high = opts.spacing_range_mm
    checked = [s for s, n in zip(spacing, shape) if n > 1]  # singleton axes of 2D data carry a dummy spacing
    if any(s <= 0 for s in checked):
        problems.append(
            Problem(
                path,
                f"spacing {_fmt(spacing)} mm has a zero axis",
                "write a valid affine (pixdim/srow) into the header",
            )
        )
    elif any(s < low or s > high for s in checked):
        problems.append(
            Problem(
                path,
                f"implausible spacing {_fmt(spacing)} mm (expected {low:g} to {high:g} mm per axis)",
                "check the header's units (metres or microns instead of mm?) and affine; if the spacing is right, "
                "widen spacing_range_mm",
            )
        )


def _check_finite(path: Path, data: np.ndarray, problems: list[Problem]) -> None:
    if not np.issubdtype(data.dtype, np.floating):
        return
    finite = np.isfinite(data)
    if not finite.all():
        nan = int(np.isnan(data).sum())
        inf = int(data.size - finite.sum() - nan)
        problems.append(
            Problem(
                path,
                f"image has {nan} NaN and {inf} Inf voxels",
                "replace them with a meaningful value (e.g. the background intensity) before training",
            )
        )


def _check_label_values(path: Path, data: np.ndarray, opts: CheckOptions, problems: list[Problem]) -> None:
    values = np.unique(data)
    if np.issubdtype(values.dtype, np.floating):
        non_integer = values[~np.isfinite(values) | (values != np.round(values))]
        if non_integer.size:
            problems.append(
                Problem(
                    path,
                    f"label has non-integer values {_fmt(non_integer[:5])}",
                    "save labels as integers (nearest-neighbour resampling, no interpolation or smoothing)",
                )
            )
            values = values[np.isfinite(values) & (values == np.round(values))]
    undeclared = sorted(int(v) for v in values if int(v) not in opts.label_values)
    if undeclared:
        problems.append(
            Problem(
                path,
                f"label values {undeclared} are not declared in dataset.json 'labels' "
                f"(declared: {sorted(opts.label_values)})",
                "add them to 'labels' in dataset.json, or correct the segmentation",
            )
        )


def check_case(
    case_id: str,
    images: Sequence[Path],
    label: Path | None,
    opts: CheckOptions,
    problems: list[Problem],
) -> None:
    """Check one case: each channel file, channels against channel 0, and the label (``None``: none expected)."""
    volumes = []
    for channel, path in enumerate(images):
        if not path.is_file():
            what = "image" if opts.layout == "msd" else f"channel {channel} file"
            problems.append(
                Problem(
                    path,
                    f"{what} of case '{case_id}' is missing",
                    "add the file (every case needs one file per channel declared in dataset.json), or remove the "
                    "case's other files",
                )
            )
            continue
        volume = _open_checked(path, "image", opts, problems)
        if volume is not None:
            volumes.append(volume)
    reference = volumes[0] if volumes else None
    for other in volumes[1:]:
        _compare(reference, other, "channel", opts, problems)
    if label is None:
        return
    if not label.is_file():
        problems.append(
            Problem(
                label,
                f"case '{case_id}' has no label",
                f"add its segmentation as {label.parent.name}/{label.name}, or move the case's images out",
            )
        )
        return
    label_volume = _open_checked(label, "label", opts, problems)
    if label_volume is not None and reference is not None:
        _compare(reference, label_volume, "label", opts, problems)


def _compare(reference: _Volume, other: _Volume, role: str, opts: CheckOptions, problems: list[Problem]) -> None:
    if reference.shape != other.shape:
        problems.append(
            Problem(
                other.path,
                f"{role} shape {other.shape} differs from image {reference.path.name} shape {reference.shape}",
                f"resample the {role} onto the image grid (nearest neighbour for labels), or re-export the pair",
            )
        )
        return
    difference = geometry_difference(reference.affine, other.affine, opts.affine_tolerance)
    if difference:
        problems.append(
            Problem(
                other.path,
                f"{role} geometry differs from image {reference.path.name}: {difference}",
                f"copy the image's affine into the {role} if they are aligned, else resample it onto the image grid",
            )
        )
