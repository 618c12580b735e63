"""A DICOM folder checked as one series, from its headers, before any pixel is read.

MONAI's ``PydicomReader`` stacks every DICOM file of a folder in InstanceNumber order and spans the slice axis from
the first to the last position. That is right for one complete series, and silently wrong otherwise: a missing
slice gives the mean distance (every slice after the gap lands in the wrong place), duplicated slices or two series
in one folder become one volume with an invented spacing. :func:`scan_series` reads the headers only
(``stop_before_pixels``) and refuses such a folder with one line naming the files and positions:

* exactly one SeriesInstanceUID (or one chosen with ``series=``, by UID or by its unique SeriesDescription);
* one ImageOrientationPatient, PixelSpacing and image size across the slices (a thousandth, as ``medseg validate``
  compares grids);
* positions along the slice normal evenly spaced, with no gap and no duplicate, and on one line (a shear from a
  gantry tilt is regular, a slice moved sideways is not). Slice positions are written with few digits, so they
  may deviate by 1 % of the spacing or 0.01 mm, whichever is larger, as in ITK and dcm2niix;
* InstanceNumber order following the positions, since that is the order MONAI stacks them in.

The result lists the series' files, so that the reader reads exactly those (other series, DICOMDIR, reports and
sub-folders stay out), and the affine that the headers imply, which the reader's result is checked against.

A single slice (a one-file series, or one ``.dcm`` file given to :func:`scan_file`) is a one-slice volume whose
affine :mod:`medseg.data.dicom_slice` builds from the slice normal and thickness.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.misc import is_dicom

from medseg.data.dicom_slice import RAS_FROM_LPS, in_plane_affine, slice_affine
from medseg.data.headers import check_declared_size
from medseg.errors import ReaderError

__all__ = ["DicomSeries", "lenient_dicom_values", "list_series", "read_dicom_header", "scan_file", "scan_series"]

_TAGS = [
    "SeriesInstanceUID",
    "SeriesDescription",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "SamplesPerPixel",
    "SliceThickness",
    "SpacingBetweenSlices",
]
_GRID_TOLERANCE = 1e-3  # relative, for orientation cosines and pixel spacing
_POSITION_RELATIVE = 0.01  # of the slice spacing
_POSITION_ABSOLUTE_MM = 0.01

_PYDICOM_SETTINGS = threading.Lock()


@contextlib.contextmanager
def lenient_dicom_values() -> Iterator[None]:
    """pydicom's value validation as its default (warn), for the duration of one read.

    MONAI's ``PydicomReader`` appends the mean slice distance, a float of up to 17 digits, to the first slice's
    ``PixelSpacing`` (a DICOM decimal string list, 16 characters at most). pydicom validates that in its global
    *reading* mode, which ``Dataset.to_json_dict`` (MONAI's metadata) switches to "raise" and back without a lock:
    reads in two threads can leave it at "raise" for good, and every later series with an unround slice distance
    then fails to load. The mode is set here, under a lock, and restored after.
    """
    with _PYDICOM_SETTINGS:
        saved = pydicom_config.settings._reading_validation_mode
        pydicom_config.settings.reading_validation_mode = pydicom_config.WARN
        try:
            yield
        finally:
            pydicom_config.settings._reading_validation_mode = saved


@dataclass(frozen=True)
class _Slice:
    path: Path
    uid: str
    description: str
    instance: int | None
    position: np.ndarray | None
    orientation: np.ndarray | None
    spacing: np.ndarray | None  # (between rows, between columns) in mm
    rows: int
    columns: int
    frames: int
    bits: int
    samples: int
    thickness: float | None = None  # SliceThickness (mm)
    between: float | None = None  # SpacingBetweenSlices (mm)


@dataclass(frozen=True)
class DicomSeries:
    """One checked series of a DICOM folder.

    Attributes:
        folder: The folder.
        uid: Its SeriesInstanceUID.
        description: Its SeriesDescription ("" when absent).
        files: The series' files in stacking (InstanceNumber) order.
        shape: ``(columns, rows, slices)``, the array order medseg reads (MONAI swaps DICOM's rows and columns);
            the frames of a multi-frame file count as slices.
        affine: The voxel-to-RAS+ mm affine that the headers imply for the stacked series, which MONAI's read must
            have; ``None`` for a single file, which MONAI reads as it is (a 2-D image for a single slice).
        slice_affine: For a single slice, the affine of the one-slice volume ``(columns, rows, 1)`` that
            :func:`medseg.data.dicom_slice.one_slice_volume` makes of MONAI's 2-D read; ``None`` for a series, a
            multi-frame file, or a slice without geometry tags.
        slice_spacing: Where that volume's spacing along the slice normal comes from (``SpacingBetweenSlices``,
            ``SliceThickness`` or :data:`medseg.data.dicom_slice.ASSUMED_SPACING`); ``None`` with ``slice_affine``.
    """

    folder: Path
    uid: str
    description: str
    files: tuple[Path, ...]
    shape: tuple[int, int, int]
    affine: np.ndarray | None
    slice_affine: np.ndarray | None = None
    slice_spacing: str | None = None


def _floats(value, count: int) -> np.ndarray | None:
    try:
        array = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return array if array.shape == (count,) else None


def _length(value) -> float | None:
    """A positive finite length in mm, or ``None`` (absent, empty, zero or not a number)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def read_dicom_header(path: Path):
    """The header of one DICOM file, without its pixels (only the tags the series checks need)."""
    try:
        with lenient_dicom_values():
            return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_TAGS)
    except Exception as err:  # pydicom raises anything from InvalidDicomError to EOFError on damaged files
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise ReaderError(
            f"{path}: its DICOM header cannot be read ({type(err).__name__}: {first}). The file is truncated or "
            f"corrupted: re-export it, or remove it from the folder."
        ) from err


def _slice(path: Path, need_uid: bool = True) -> _Slice | None:
    """One image file's geometry; ``None`` for DICOM objects without pixels (DICOMDIR, reports, RT structures)."""
    ds = read_dicom_header(path)
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if (need_uid and not uid) or rows is None or columns is None:
        return None
    instance = ds.get("InstanceNumber")
    try:
        instance = int(instance) if instance not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    frames = ds.get("NumberOfFrames")
    try:
        frames = max(int(frames), 1) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        frames = 1
    bits = int(ds.get("BitsAllocated", 16) or 16)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    return _Slice(
        path=path,
        uid=uid,
        description=str(ds.get("SeriesDescription", "") or "").strip(),
        instance=instance,
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        spacing=_floats(ds.get("PixelSpacing"), 2),
        rows=int(rows),
        columns=int(columns),
        frames=frames,
        bits=bits,
        samples=samples,
        thickness=_length(ds.get("SliceThickness")),
        between=_length(ds.get("SpacingBetweenSlices")),
    )


def _dicom_files(folder: Path) -> list[Path]:
    """The folder's files with the DICOM preamble, hidden files excluded (as MONAI's ``glob("*")`` does)."""
    files = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or not child.is_file():
            continue
        try:
            if is_dicom(child):
                files.append(child)
        except OSError as err:
            raise ReaderError(f"{child} cannot be opened ({err}); check its permissions or remove it.") from err
    return files


def _describe(slices: Sequence[_Slice]) -> str:
    first = slices[0]
    name = f"'{first.description}'" if first.description else "no description"
    return f"{first.uid} ({name}, {len(slices)} file{'s' if len(slices) > 1 else ''})"


def _select(folder: Path, groups: dict[str, list[_Slice]], series: str | None) -> list[_Slice]:
    listing = "; ".join(_describe(g) for g in groups.values())
    if series is None:
        if len(groups) == 1:
            return next(iter(groups.values()))
        raise ReaderError(
            f"{folder} holds {len(groups)} DICOM series, and medseg reads one series per folder: {listing}. Move each "
            f"series into its own folder, or select one by its SeriesInstanceUID or SeriesDescription (series=... in "
            f"Python, --series where the command offers it)."
        )
    wanted = series.strip()
    if wanted in groups:
        return groups[wanted]
    matches = [g for g in groups.values() if g[0].description.lower() == wanted.lower()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ReaderError(
            f"{folder} holds no DICOM series with the UID or description '{series}'. Its series: {listing}. Give "
            f"one of these UIDs or descriptions."
        )
    raise ReaderError(
        f"{folder}: {len(matches)} DICOM series are described as '{series}': "
        f"{'; '.join(_describe(g) for g in matches)}. Select one by its SeriesInstanceUID."
    )


def _consistent(folder: Path, slices: Sequence[_Slice]) -> None:
    """Same image size, orientation and pixel spacing on every slice, and the geometry tags present."""
    first = slices[0]
    for s in slices:
        missing = [
            name
            for name, value in (
                ("ImagePositionPatient", s.position),
                ("ImageOrientationPatient", s.orientation),
                ("PixelSpacing", s.spacing),
            )
            if value is None or not np.all(np.isfinite(value))
        ]
        if missing:
            raise ReaderError(
                f"{s.path}: {' and '.join(missing)} missing or not finite, so the slice cannot be placed in the "
                f"series. Re-export the series with its geometry tags, or convert it with dcm2niix."
            )
        if s.frames > 1:
            raise ReaderError(
                f"{s.path} is a multi-frame file ({s.frames} frames) inside a folder of {len(slices)} files of one "
                f"series. Give the multi-frame file itself, or move it into its own folder."
            )
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise ReaderError(
                f"{folder}: {s.path.name} is {s.rows}x{s.columns} pixels but {first.path.name} is "
                f"{first.rows}x{first.columns}; one series has one image size. Remove the odd file(s), or re-export "
                f"the series."
            )
        if np.any(np.abs(s.orientation - first.orientation) > _GRID_TOLERANCE):
            raise ReaderError(
                f"{folder}: the slices have different orientations (ImageOrientationPatient {_fmt(s.orientation)} "
                f"in {s.path.name}, {_fmt(first.orientation)} in {first.path.name}), e.g. a localizer or projections, "
                f"not one volume. Keep only the files of one volume in the folder."
            )
        if np.any(np.abs(s.spacing - first.spacing) > _GRID_TOLERANCE * first.spacing):
            raise ReaderError(
                f"{folder}: the slices have different pixel spacings (PixelSpacing {_fmt(s.spacing)} mm in "
                f"{s.path.name}, {_fmt(first.spacing)} mm in {first.path.name}), not one volume. Keep only the files "
                f"of one volume in the folder."
            )


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _positions(folder: Path, slices: Sequence[_Slice]) -> None:
    """Evenly spaced positions along the slice normal, no duplicate, on one line, in InstanceNumber order."""
    orientation = slices[0].orientation
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    along = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(along, kind="stable")
    ordered = [slices[i] for i in order]
    distance = np.diff(along[order])
    typical = float(np.median(distance))
    tolerance = max(_POSITION_ABSOLUTE_MM, _POSITION_RELATIVE * typical)
    same = [i for i, d in enumerate(distance) if d <= tolerance]
    if same:
        pairs = ", ".join(
            f"{ordered[i].path.name} and {ordered[i + 1].path.name} at {along[order][i]:.3f} mm" for i in same[:3]
        )
        more = f" and {len(same) - 3} more" if len(same) > 3 else ""
        raise ReaderError(
            f"{folder}: duplicated slices, at the same position along the slice normal: {pairs}{more}. Remove the "
            f"duplicate files (or separate the acquisitions into their own folders)."
        )
    off = [i for i, d in enumerate(distance) if abs(d - typical) > tolerance]
    if off:
        gaps = ", ".join(
            f"{ordered[i].path.name} at {along[order][i]:.3f} mm to {ordered[i + 1].path.name} at "
            f"{along[order][i + 1]:.3f} mm ({distance[i]:.3f} mm)"
            for i in off[:3]
        )
        more = f" and {len(off) - 3} more" if len(off) > 3 else ""
        raise ReaderError(
            f"{folder}: the slices are not evenly spaced along the slice normal (most are {typical:.3f} mm apart; "
            f"{gaps}{more}): slices are missing or the series is irregular. Add the missing slice files or re-export "
            f"the complete series; medseg does not interpolate gaps."
        )
    start, end = ordered[0].position, ordered[-1].position
    steps = (along[order] - along[order][0]) / (along[order][-1] - along[order][0])
    for s, t in zip(ordered, steps):
        deviation = float(np.linalg.norm(s.position - (start + t * (end - start))))
        if deviation > tolerance:
            raise ReaderError(
                f"{folder}: {s.path.name} (ImagePositionPatient {_fmt(s.position)}) lies {deviation:.3f} mm off the "
                f"line of the other slices' positions, so they do not form one regular volume. Remove the odd file, "
                f"or re-export the series."
            )
    instances = [s.instance for s in slices]
    if None in instances or len(set(instances)) != len(instances):
        bad = next(s for s in slices if s.instance is None or instances.count(s.instance) > 1)
        raise ReaderError(
            f"{folder}: {bad.path.name} has "
            f"{'no InstanceNumber' if bad.instance is None else f'InstanceNumber {bad.instance}, as another file has'}"
            f"; medseg stacks slices in InstanceNumber order, so every slice needs its own number. Renumber the "
            f"slices, or convert the series with dcm2niix."
        )
    by_instance = along[np.argsort(np.array(instances), kind="stable")]
    steps = np.diff(by_instance)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        raise ReaderError(
            f"{folder}: the InstanceNumber order does not follow the slice positions, and medseg stacks slices in "
            f"InstanceNumber order. Renumber the slices in position order, or convert the series with dcm2niix."
        )


def _affine(slices: Sequence[_Slice]) -> np.ndarray:
    """Voxel-to-RAS+ affine of the stack in InstanceNumber order, array axes (columns, rows, slices) as MONAI."""
    ordered = sorted(slices, key=lambda s: s.instance)
    first, last = ordered[0], ordered[-1]
    affine = in_plane_affine(first.position, first.orientation, first.spacing)
    affine[:3, 2] = (last.position - first.position) / (len(ordered) - 1)
    return RAS_FROM_LPS @ affine


def _check_size(where: Path, first: _Slice, frames: int) -> None:
    shape = (first.columns, first.rows, frames) + ((first.samples,) if first.samples > 1 else ())
    itemsize = next(n for n in (1, 2, 4, 8) if first.bits <= 8 * n or n == 8)
    check_declared_size(where, shape, f"u{itemsize}")


def _single(folder: Path, only: _Slice) -> DicomSeries:
    """The series of one file: a multi-frame file as MONAI places it, a single frame as a one-slice volume."""
    shape = (only.columns, only.rows, only.frames)
    if only.frames > 1:
        return DicomSeries(folder, only.uid, only.description, (only.path,), shape, None)
    affine, source = slice_affine(only.position, only.orientation, only.spacing, only.between, only.thickness)
    return DicomSeries(folder, only.uid, only.description, (only.path,), shape, None, affine, source)


def list_series(folder: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(SeriesInstanceUID, SeriesDescription)`` of every image series in ``folder``, by UID: what ``series=``
    accepts. Headers only; a folder of one series gives one entry."""
    slices = [s for s in (_slice(p) for p in _dicom_files(Path(folder))) if s is not None]
    return sorted({(s.uid, s.description) for s in slices})


def scan_series(folder: str | os.PathLike[str], series: str | None = None) -> DicomSeries:
    """Check a DICOM folder as one series from its headers, and list the files to read.

    Args:
        folder: The DICOM series folder.
        series: The series to read when the folder holds several: its SeriesInstanceUID, or its
            SeriesDescription if no other series has the same (case-insensitive).

    Raises:
        ReaderError: no DICOM image, several series without ``series`` (the message lists them), no series matching
            ``series``, an unreadable header, inconsistent slices, a gap, a duplicate, slices off one line, an
            InstanceNumber order against the positions, or a volume above the memory limit.
    """
    folder = Path(folder)
    slices = [s for s in (_slice(p) for p in _dicom_files(folder)) if s is not None]
    if not slices:
        raise ReaderError(
            f"{folder} holds no DICOM images (files with the 'DICM' preamble, a SeriesInstanceUID and pixel rows and "
            f"columns). Give the folder of one image series."
        )
    groups: dict[str, list[_Slice]] = defaultdict(list)
    for s in slices:
        groups[s.uid].append(s)
    chosen = _select(folder, dict(groups), series)
    first = chosen[0]
    _check_size(folder, first, first.frames if len(chosen) == 1 else len(chosen))
    if len(chosen) == 1:
        return _single(folder, first)
    _consistent(folder, chosen)
    _positions(folder, chosen)
    ordered = sorted(chosen, key=lambda s: s.instance)
    return DicomSeries(
        folder,
        first.uid,
        first.description,
        tuple(s.path for s in ordered),
        (first.columns, first.rows, len(ordered)),
        _affine(ordered),
    )


def scan_file(path: str | os.PathLike[str]) -> DicomSeries:
    """Check one DICOM file from its header: an image within the memory limit; its geometry as :func:`scan_series`.

    Raises:
        ReaderError: an unreadable header, no image (no Rows and Columns: a report, RT structure or DICOMDIR), or
            a declared size above the memory limit.
    """
    path = Path(path)
    only = _slice(path, need_uid=False)
    if only is None:
        raise ReaderError(
            f"{path} is a DICOM object without an image (no Rows and Columns: a report, structure set or DICOMDIR). "
            f"Give an image file, or the folder of an image series."
        )
    _check_size(path, only, only.frames)
    return _single(path.parent, only)
