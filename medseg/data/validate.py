"""Check a dataset folder and report every problem in one pass, as nnU-Net's ``verify_dataset_integrity`` does.

Unlike nnU-Net, which stops at the first failed assertion, :func:`validate_dataset` never raises for a bad file: an
unreadable or truncated file, a missing label, a wrong header or unexpected voxel values each become a
:class:`Problem` that names the file, says what is wrong and how to fix it, so that one run lists everything.

Headers are read lazily with nibabel (NIfTI) and voxel data only for the checks that need it (labels' values,
images' NaN/Inf, and truncated files, which only show when the data is decompressed). Other file endings (``.nrrd``,
``.mha``...) are read with SimpleITK and converted to nibabel's RAS+ convention.

Geometry is compared the way nnU-Net does (shape, then spacing, origin and direction) but with a tolerance scaled to
the voxel size instead of ``np.allclose``'s absolute one: with ``affine_tolerance=t``, spacings may differ by
``t * spacing``, origins by ``t * smallest spacing`` (mm), and direction cosines by ``t``. The default 1e-3 absorbs
float32 rounding in headers but catches any real misregistration (a thousandth of a voxel).

Dimensionality: images and labels must be 3D. A 2D dataset is stored as 3D with a singleton axis (``(X, Y, 1)``),
whose spacing is not checked (nnU-Net writes a dummy 999 there). The only 4D files allowed are MSD multi-modal
images whose fourth axis holds the dataset's channels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.formats import (
    DATASET_JSON,
    KNOWN_ENDINGS,
    DatasetInfo,
    check_dataset_json,
    detect_layout,
    load_dataset_info,
    split_channel_name,
)
from medseg.errors import MedsegError
from medseg.paths import find_dataset

__all__ = ["Problem", "geometry_difference", "open_image", "validate_dataset"]

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
    """Open an image with nibabel conventions (``.affine`` maps voxel indices to RAS+ mm).

    NIfTI files are opened lazily (header only, data read on access); other formats are read with SimpleITK, whose
    LPS geometry is converted to RAS and whose (z, y, x) array is transposed to nibabel's (x, y, z) order.
    """
    if str(path).endswith((".nii", ".nii.gz")):
        return nib.load(str(path))
    import SimpleITK as sitk

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
class _Options:
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


def _open_checked(path: Path, role: str, opts: _Options, problems: list[Problem]) -> _Volume | None:
    """Open one file and check what it holds by itself; ``None`` when it is unusable for comparisons."""
    try:
        image = open_image(path)
        shape = tuple(int(s) for s in image.shape)
        affine = np.asarray(image.affine, dtype=float)
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


def _check_spacing(path: Path, shape: Sequence[int], affine: np.ndarray, opts: _Options, problems: list[Problem]):
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


def _check_label_values(path: Path, data: np.ndarray, opts: _Options, problems: list[Problem]) -> None:
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


def _check_case(
    case_id: str,
    images: Sequence[Path],
    label: Path | None,
    opts: _Options,
    problems: list[Problem],
) -> None:
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


def _compare(reference: _Volume, other: _Volume, role: str, opts: _Options, problems: list[Problem]) -> None:
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


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _stray_file(path: Path, file_ending: str) -> Problem | None:
    """A problem for a file that does not end with ``file_ending`` (hidden non-image files are ignored)."""
    if path.name.endswith(file_ending):
        return None
    known = next((e for e in KNOWN_ENDINGS if path.name.endswith(e)), None)
    if known:
        return Problem(
            path,
            f"file ending '{known}' differs from dataset.json file_ending '{file_ending}'",
            f"convert the file to {file_ending} (one ending for the whole dataset), or change 'file_ending'",
        )
    if path.name.startswith("."):
        return None
    return Problem(path, f"orphan file: not a {file_ending} image", f"move it out of {path.parent.name}/")


def _nnunet_cases(info: DatasetInfo, problems: list[Problem]):
    """Report stray and orphan files, then yield ``(case_id, expected image paths, expected label or None)``."""
    ending, n = info.file_ending, info.num_channels
    for split, cases in (("Tr", info.training), ("Ts", info.test)):
        for path in _folder_files(info.root / f"images{split}"):
            stray = _stray_file(path, ending)
            parsed = split_channel_name(path.name, ending)
            if stray:
                problems.append(stray)
            elif parsed is None:
                problems.append(
                    Problem(
                        path,
                        f"orphan file: its name does not follow CASE_XXXX{ending} (XXXX = 4-digit channel index)",
                        f"rename it, e.g. {path.name[: -len(ending)]}_0000{ending}, or delete it",
                    )
                )
            elif parsed[1] >= n:
                problems.append(
                    Problem(
                        path,
                        f"orphan file: channel index {parsed[1]:04d} but dataset.json declares {n} channel(s)",
                        "add the channel to 'channel_names', or remove/rename the file",
                    )
                )
        ids = {case.case_id for case in cases}
        for path in _folder_files(info.root / f"labels{split}"):
            stray = _stray_file(path, ending)
            if stray:
                problems.append(stray)
            elif path.name[: -len(ending)] not in ids:
                case_id = path.name[: -len(ending)]
                problems.append(
                    Problem(
                        path,
                        f"label of case '{case_id}' has no image in images{split}/",
                        f"add its image(s) {case_id}_0000{ending}..., or delete the label",
                    )
                )
    for split, cases in (("Tr", info.training), ("Ts", info.test)):
        labels_dir = info.root / f"labels{split}"
        needs_label = split == "Tr" or labels_dir.is_dir()
        for case in cases:
            images = [info.root / f"images{split}" / f"{case.case_id}_{c:04d}{ending}" for c in range(n)]
            label = labels_dir / f"{case.case_id}{ending}" if needs_label else None
            yield case.case_id, images, label


def _msd_cases(info: DatasetInfo, problems: list[Problem]):
    """Like :func:`_nnunet_cases`, with the cases listed in dataset.json and orphans being files not listed."""
    raw, root, ending = info.raw, info.root, info.file_ending
    listed: set[Path] = set()
    entries = [("Tr", e["image"], e.get("label")) for e in raw["training"]]
    for entry in raw.get("test", []):
        image = entry if isinstance(entry, str) else entry["image"]
        label = entry.get("label") if isinstance(entry, dict) else None
        if label is None and (root / "labelsTs").is_dir():
            label = f"./labelsTs/{Path(image).name}"
        entries.append(("Ts", image, label))
    for split, image, label in entries:
        image_path = (root / image).resolve()
        label_path = (root / (label or f"./labelsTr/{Path(image).name}")).resolve() if split == "Tr" or label else None
        listed.update(p for p in (image_path, label_path) if p is not None)
        if not image_path.name.endswith(ending):
            problems.append(_stray_file(image_path, ending) or Problem(image_path, "unexpected ending", "rename it"))
        yield (
            image_path.name[: -len(ending)] if image_path.name.endswith(ending) else image_path.stem,
            [image_path],
            label_path,
        )
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        for path in _folder_files(root / folder):
            if path.resolve() not in listed and not (path.name.startswith(".") and not path.name.endswith(ending)):
                role = "label" if folder.startswith("labels") else "image"
                key = "training" if folder.endswith("Tr") else "test"
                problems.append(
                    Problem(
                        path,
                        f"orphan file: this {role} is not listed in dataset.json '{key}'",
                        "list it in dataset.json, or delete it",
                    )
                )


def validate_dataset(
    path: str | os.PathLike[str],
    *,
    spacing_range_mm: tuple[float, float] = (0.05, 20.0),
    affine_tolerance: float = 1e-3,
    check_voxels: bool = True,
) -> list[Problem]:
    """Every problem of a dataset (nnU-Net v2 or MSD layout), in one pass; an empty list means it is usable.

    Args:
        path: Dataset folder, or a name resolved by :func:`medseg.paths.find_dataset`.
        spacing_range_mm: Plausible voxel spacing per axis in mm; outside it a file is reported (metres vs mm...).
        affine_tolerance: Relative tolerance of geometry comparisons (see the module docstring).
        check_voxels: Read voxel data to check label values, NaN/Inf and truncated files. ``False`` reads headers
            only, which is much faster on large datasets but misses those problems.

    Returns:
        The problems, dataset-level ones first, then files in folder order, then cases in id order.

    Raises:
        DatasetError: ``path`` names no dataset folder at all.
    """
    root = find_dataset(path)
    json_path = root / DATASET_JSON
    if not json_path.is_file():
        return [Problem(json_path, "dataset.json is missing", "write it (medseg.data.formats.write_dataset_json)")]
    try:
        raw = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [Problem(json_path, f"not valid JSON ({err})", "fix the syntax; `python -m json.tool` shows where")]
    if not isinstance(raw, dict):
        return [Problem(json_path, "the top level is not a JSON object", "write dataset.json as {...}")]
    issues = check_dataset_json(raw)
    if issues:
        return [Problem(json_path, f"field '{field}': {message}", fix) for field, message, fix in issues]
    try:
        info = load_dataset_info(root)
    except MedsegError as err:
        return [Problem(json_path, str(err), "fix dataset.json")]

    problems: list[Problem] = []
    values = sorted(info.labels.values())
    if values != list(range(len(values))):
        problems.append(
            Problem(json_path, f"label values {values} are not consecutive (0, 1, 2, ...)", "renumber the labels")
        )
    layout = detect_layout(raw)
    expected = len(raw["training"]) if layout == "msd" else len(info.training)
    if "numTraining" in raw and raw["numTraining"] != expected:
        where = "listed in 'training'" if layout == "msd" else "found in imagesTr/"
        problems.append(
            Problem(
                json_path,
                f"numTraining is {raw['numTraining']} but {expected} training cases were {where}",
                f"set numTraining to {expected}, or add/remove the missing/extra cases",
            )
        )
    for folder in ("imagesTr", "labelsTr"):
        if not (info.root / folder).is_dir():
            problems.append(Problem(info.root / folder, "folder is missing", f"create {folder}/ with the case files"))
    opts = _Options(
        spacing_range_mm=tuple(spacing_range_mm),
        affine_tolerance=affine_tolerance,
        check_voxels=check_voxels,
        label_values=frozenset(info.labels.values()),
        num_channels=info.num_channels,
        layout=layout,
    )
    cases = list(_msd_cases(info, problems) if layout == "msd" else _nnunet_cases(info, problems))
    for case_id, images, label in cases:
        _check_case(case_id, images, label, opts, problems)
    return problems
