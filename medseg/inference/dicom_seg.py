"""Predicted label maps as DICOM Segmentation objects, written with ``highdicom``, for DICOM inputs.

A NIfTI label map carries no Study, Series or Frame-of-Reference UID, so a PACS cannot store it beside its scan and
OHIF cannot overlay it. A DICOM SEG (binary segmentation, one segment per label) can. What medseg writes:

* one segment per label of the dataset (``label_names``, background left out) and per other value in the label map,
  in label order; an empty label is an empty segment. Each segment has the label's name, the codes given for it
  (``label_codes`` of ``dataset.json``: a category and a type, each ``[CodeValue, CodingSchemeDesignator,
  CodeMeaning]``), else the generic SNOMED CT "Tissue" / "Tissue" that DICOM viewers show as a plain label;
* the source series' patient, study and Frame of Reference, every frame referencing its source image, and an
  algorithm identification that names the model and its (release) version;
* only frames with content (highdicom's ``omit_empty_frames``; an all-empty map keeps every frame, since a SEG
  needs one);
* atomically: a temporary file in the same folder, renamed when complete (:mod:`medseg.atomic`).

The label map is on the grid medseg reads the series into (:func:`medseg.data.io.load_image`): array axes
``(columns, rows, slices)``, slices in the order of :attr:`medseg.data.dicom_series.DicomSeries.files`. Frame ``k``
of the SEG is slice ``k`` transposed to DICOM's ``(rows, columns)``. Before anything is written, each source image's
ImagePositionPatient, ImageOrientationPatient and PixelSpacing are checked to put slice ``k`` where the label map's
affine puts it, so every segment pixel has the world position of the NIfTI voxel that carries the same label.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import torch
from pydicom.sr.coding import Code

from medseg.atomic import atomic_path
from medseg.data.dicom_series import DicomSeries, lenient_dicom_values, scan_file, scan_series
from medseg.data.dicom_slice import RAS_FROM_LPS
from medseg.errors import ConfigError, ReaderError
from medseg.inference.cases import Case
from medseg.inference.loaded import LoadedModel
from medseg.inference.preflight import SEG_SUFFIX, OutputError
from medseg.inference.sliding import InferenceError
from medseg.inference.writers import checked_labels

__all__ = [
    "GENERIC_CODE",
    "SEG_SUFFIX",
    "SegAlgorithm",
    "SegmentCode",
    "parse_label_codes",
    "seg_algorithm",
    "seg_path",
    "source_series",
    "write_dicom_seg",
    "write_seg_for_case",
]

GENERIC_CODE = Code("85756007", "SCT", "Tissue")  # category and type of a label without codes
_ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")  # CID 7162
_POSITION_TOLERANCE = 1e-3  # of the smallest voxel size, as medseg.data.checks compares grids
_SERIES_NUMBER_OFFSET = 1000  # the SEG's SeriesNumber: the source's plus this, so they sort together
_LO = 64  # characters of a DICOM long string (segment labels, names)


@dataclass(frozen=True)
class SegmentCode:
    """The coded meaning of one segment: what kind of thing it is (category) and which (type)."""

    category: Code
    type: Code


@dataclass(frozen=True)
class SegAlgorithm:
    """Who made the segmentation, as the SEG records it.

    Attributes:
        name: The model, e.g. a release name or ``litemedsam``.
        version: Its version (a release's version; a run's checkpoint).
        label_names: ``{label value: name}``, background 0 included or not.
        codes: ``{label name: SegmentCode}`` for the labels that have codes.
        prompted: whether a user's prompts guided it (SEMIAUTOMATIC) or not (AUTOMATIC).
        serial: the model's weights hash (the SEG's DeviceSerialNumber).
    """

    name: str
    version: str
    label_names: Mapping[int, str] = field(default_factory=dict)
    codes: Mapping[str, SegmentCode] = field(default_factory=dict)
    prompted: bool = False
    serial: str = ""


def _code(value: Any, where: str) -> Code:
    if isinstance(value, Code):
        return value
    if isinstance(value, Mapping):
        value = [value.get("CodeValue"), value.get("CodingSchemeDesignator"), value.get("CodeMeaning")]
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 3
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        raise ConfigError(
            f"{where} must be [CodeValue, CodingSchemeDesignator, CodeMeaning] (three non-empty strings), got "
            f'{value!r}; e.g. ["10200004", "SCT", "Liver"].'
        )
    return Code(*(v.strip() for v in value))


def parse_label_codes(raw: Mapping[str, Any] | None, where: str = "label_codes") -> dict[str, SegmentCode]:
    """``{label name: SegmentCode}`` from ``dataset.json``'s ``label_codes`` (``None``: no codes).

    Each entry is ``{"category": [value, scheme, meaning], "type": [value, scheme, meaning]}``; a code may also be
    ``{"CodeValue": ..., "CodingSchemeDesignator": ..., "CodeMeaning": ...}``.

    Raises:
        ConfigError: not a mapping of such entries; the message names the entry and shows the form.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f'{where} must map label names to {{"category": [...], "type": [...]}}, got {raw!r}.')
    codes = {}
    for name, entry in raw.items():
        if isinstance(entry, SegmentCode):
            codes[str(name)] = entry
            continue
        if not isinstance(entry, Mapping) or set(entry) != {"category", "type"}:
            raise ConfigError(
                f'{where}[{name!r}] must be {{"category": [value, scheme, meaning], "type": [value, scheme, '
                f"meaning]}}, got {entry!r}."
            )
        codes[str(name)] = SegmentCode(
            _code(entry["category"], f"{where}[{name!r}].category"), _code(entry["type"], f"{where}[{name!r}].type")
        )
    return codes


def _label_array(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    return checked_labels(labels).astype(np.int64)


def _floats(ds: pydicom.Dataset, keyword: str, count: int) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in ds[keyword].value], dtype=float)
    except (KeyError, TypeError, ValueError):
        values = np.empty(0)
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        where = getattr(ds, "filename", None) or f"SOPInstanceUID {ds.get('SOPInstanceUID', '?')}"
        raise ReaderError(
            f"{where}: {keyword} is missing or not {count} finite numbers, so its segment frames cannot be placed. "
            f"Write NIfTI for this series instead (--output-format nifti)."
        )
    return values


def _check_sources(shape: tuple[int, ...], sources: Sequence[pydicom.Dataset], affine: np.ndarray | None) -> None:
    """Slice ``k`` of the label map and source image ``k`` must be the same pixels of the same world (docstring)."""
    if len(sources) != shape[2]:
        raise InferenceError(
            f"the label map has {shape[2]} slices but {len(sources)} source images were given; give the series' "
            f"images in the order the label map's last axis stacks them (DicomSeries.files)."
        )
    frames = {int(ds.get("NumberOfFrames", 1) or 1) for ds in sources}
    if frames != {1}:
        raise ReaderError(
            "a multi-frame source image: medseg writes DICOM SEG for series of single-frame images; write NIfTI for "
            "it instead (--output-format nifti)."
        )
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in sources}
    if len(frames_of_reference) != 1 or "" in frames_of_reference:
        raise ReaderError(
            f"the source images have {len(frames_of_reference - {''})} FrameOfReferenceUID(s) (one is needed, shared "
            f"by every slice), so a segmentation cannot be placed on them. Write NIfTI instead (--output-format nifti)."
        )
    first = sources[0]
    in_plane = np.eye(4)
    spacing = _floats(first, "PixelSpacing", 2)
    orientation = _floats(first, "ImageOrientationPatient", 6)
    in_plane[:3, 0], in_plane[:3, 1] = orientation[:3] * spacing[1], orientation[3:] * spacing[0]
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3) for ds in sources])
    if affine is None:  # the series' own stacking: first to last position, evenly
        affine = in_plane.copy()
        affine[:3, 2] = (positions[-1] - positions[0]) / max(len(sources) - 1, 1)
        affine[:3, 3] = positions[0]
        affine = RAS_FROM_LPS @ affine
    lps = RAS_FROM_LPS @ np.asarray(affine, dtype=float)
    tolerance = _POSITION_TOLERANCE * float(np.linalg.norm(lps[:3, :2], axis=0).min())
    for k, ds in enumerate(sources):
        if (int(ds.Columns), int(ds.Rows)) != tuple(shape[:2]):
            raise InferenceError(
                f"source image {k} is {ds.Columns}x{ds.Rows} (columns x rows) but the label map's slices are "
                f"{shape[0]}x{shape[1]}; the label map is not on this series' grid."
            )
        orientation_k = _floats(ds, "ImageOrientationPatient", 6)
        spacing_k = _floats(ds, "PixelSpacing", 2)
        axes = np.stack([orientation_k[:3] * spacing_k[1], orientation_k[3:] * spacing_k[0]], 1)
        expected = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
        if np.abs(axes - lps[:3, :2]).max() > tolerance or np.linalg.norm(positions[k] - expected) > tolerance:
            raise InferenceError(
                f"source image {k} (ImagePositionPatient {np.round(positions[k], 3).tolist()}) is not slice {k} of "
                f"the label map (expected at {np.round(expected, 3).tolist()} LPS mm); give the series' images in "
                f"the label map's slice order."
            )


def _segments(array: np.ndarray, algorithm: SegAlgorithm) -> tuple[list[int], list[hd.seg.SegmentDescription]]:
    values = sorted(({int(v) for v in algorithm.label_names} | {int(v) for v in np.unique(array)}) - {0})
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:_LO], family=_ALGORITHM_FAMILY, version=algorithm.version[:_LO]
    )
    descriptions = []
    for number, value in enumerate(values, start=1):
        name = algorithm.label_names.get(value) or f"label {value}"
        code = algorithm.codes.get(name, SegmentCode(GENERIC_CODE, GENERIC_CODE))
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:_LO],
                segmented_property_category=code.category,
                segmented_property_type=code.type,
                algorithm_type="SEMIAUTOMATIC" if algorithm.prompted else "AUTOMATIC",
                algorithm_identification=identification,
                tracking_uid=hd.UID(),
                tracking_id=f"{name} (label {value})"[:_LO],
            )
        )
    return values, descriptions


def _software_version() -> str:
    try:
        return f"medseg {metadata.version('medseg')}"
    except metadata.PackageNotFoundError:  # a source checkout that is not installed
        return "medseg"


def write_dicom_seg(
    labels: np.ndarray | torch.Tensor,
    source_datasets: Sequence[pydicom.Dataset],
    label_names: Mapping[int, str],
    path: str | os.PathLike[str],
    algorithm_name: str,
    algorithm_version: str,
    codes: Mapping[str, Any] | None = None,
    *,
    affine: np.ndarray | None = None,
    prompted: bool = False,
    serial: str = "",
) -> Path:
    """Write a label map as a binary DICOM SEG on its source series, atomically (module docstring).

    Args:
        labels: ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) integer label map: ``(columns, rows, slices)`` of the series.
        source_datasets: the series' images (headers suffice), in the order of the label map's last axis.
        label_names: ``{label value: name}``; every non-zero label gets a segment, present or not.
        path: the ``.dcm`` file to write.
        algorithm_name, algorithm_version: the model and its version, in each segment's algorithm identification.
        codes: ``{label name: {"category": [...], "type": [...]}}`` or :class:`SegmentCode` values
            (:func:`parse_label_codes`); labels without codes get :data:`GENERIC_CODE`.
        affine: the label map's voxel-to-RAS+ affine (the read image's); if given, the sources must match it.
        prompted: made from a user's prompts (segments marked SEMIAUTOMATIC).
        serial: the model's weights hash, recorded as DeviceSerialNumber.

    Returns:
        The written path.

    Raises:
        InferenceError: labels that are not a label map, or not on the sources' grid or slice order.
        ReaderError: sources without the geometry or Frame of Reference a SEG needs, or multi-frame sources.
        ConfigError: malformed ``codes``.
        OutputError: the file system refused the write.
    """
    array = _label_array(labels)
    sources = list(source_datasets)
    _check_sources(array.shape, sources, affine)
    algorithm = SegAlgorithm(
        algorithm_name, algorithm_version, dict(label_names), parse_label_codes(codes), prompted, serial
    )
    values, descriptions = _segments(array, algorithm)
    lookup = np.zeros(max([int(array.max()) if array.size else 0, *values]) + 1, dtype=np.uint16)
    lookup[values] = np.arange(1, len(values) + 1)
    numbers = lookup[array]
    pixels = np.ascontiguousarray(np.transpose(numbers, (2, 1, 0)))  # (slices, rows, columns)
    pixels = pixels.astype(np.uint8 if len(values) <= np.iinfo(np.uint8).max else np.uint16)
    first = sources[0]
    try:
        series_number = int(first.get("SeriesNumber", 0) or 0) + _SERIES_NUMBER_OFFSET
    except (TypeError, ValueError):
        series_number = _SERIES_NUMBER_OFFSET
    with lenient_dicom_values():
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medseg",
            manufacturer_model_name=algorithm_name[:_LO],
            software_versions=_software_version(),
            device_serial_number=(serial or "unknown")[:_LO],
            series_description=f"medseg {algorithm_name}"[:_LO],
            content_label="MEDSEG",
            content_description=f"{algorithm_name} {algorithm_version}"[:_LO],
            omit_empty_frames=True,
        )
    path = Path(path)
    try:
        with atomic_path(path) as temporary:
            seg.save_as(temporary)
    except OSError as err:
        raise OutputError(
            f"cannot write {path} ({err.strerror or err}). Free disk space, or give -o a writable folder."
        ) from None
    return path


def source_series(path: str | os.PathLike[str], series: str | None = None) -> tuple[DicomSeries, list]:
    """The checked series behind a DICOM input (a series folder or one file) and its images' headers, in order.

    The files are those :func:`medseg.data.io.load_image` reads, in the order it stacks them, so the headers line up
    with the label map's slices.
    """
    path = Path(path)
    checked = scan_series(path, series) if path.is_dir() else scan_file(path)
    with lenient_dicom_values():
        datasets = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in checked.files]
    return checked, datasets


def seg_path(name: str, output_dir: str | os.PathLike[str]) -> Path:
    """Where a case's DICOM SEG goes: ``OUTPUT_DIR/<case>.dcm``, beside ``<case>.nii.gz``."""
    return Path(output_dir) / f"{name}{SEG_SUFFIX}"


def seg_algorithm(loaded: LoadedModel, prompted: bool, codes: Mapping[str, Any] | None = None) -> SegAlgorithm:
    """What a SEG records of a loaded model: a release's name and version, else its source, and its labels."""
    extras = loaded.extras or {}
    name = str(extras.get("name") or loaded.source.split(" (")[0] or "medseg model")
    checkpoint = Path(str(extras["checkpoint"])).name if extras.get("checkpoint") else ""
    version = str(extras.get("version") or checkpoint or _software_version())
    return SegAlgorithm(name, version, dict(loaded.label_names), parse_label_codes(codes), prompted, loaded.weights_id)


def write_seg_for_case(
    case: Case,
    labels: np.ndarray | torch.Tensor,
    algorithm: SegAlgorithm,
    output_dir: str | os.PathLike[str],
    affine: np.ndarray | torch.Tensor | None = None,
) -> Path:
    """Write ``OUTPUT_DIR/<case>.dcm`` for a DICOM case of ``medseg predict`` (what predict calls).

    Args:
        case: the DICOM case (:class:`medseg.inference.cases.Case` with ``is_dicom``).
        labels: its label map on the grid it was read on.
        algorithm: :func:`seg_algorithm` of the model.
        output_dir: the prediction folder.
        affine: the read image's affine (``image.affine``); checked against the series' headers when given.

    Raises:
        ConfigError: the case is not DICOM (a SEG needs a source series).
        InferenceError, ReaderError, OutputError: as :func:`write_dicom_seg`.
    """
    if not case.is_dicom:
        raise ConfigError(
            f"{case.path} is not a DICOM input, and a DICOM SEG needs the source series; write NIfTI for it "
            f"(--output-format nifti)."
        )
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    _, datasets = source_series(case.path, case.series)
    return write_dicom_seg(
        labels,
        datasets,
        algorithm.label_names,
        seg_path(case.name, output_dir),
        algorithm.name,
        algorithm.version,
        algorithm.codes,
        affine=None if affine is None else np.asarray(affine, dtype=float),
        prompted=algorithm.prompted,
        serial=algorithm.serial,
    )
