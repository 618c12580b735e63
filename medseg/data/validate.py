"""Check a dataset folder and report every problem in one pass, as nnU-Net's ``verify_dataset_integrity`` does.

Unlike nnU-Net, which stops at the first failed assertion, :func:`validate_dataset` never raises for a bad file: an
unreadable or truncated file, a missing label, a wrong header or unexpected voxel values each become a
:class:`Problem` that names the file, says what is wrong and how to fix it, so that one run lists everything.

Headers are read lazily with nibabel (NIfTI) and voxel data only for the checks that need it (labels' values,
images' NaN/Inf, and truncated files, which only show when the data is decompressed). Each header first goes
through the checks every medseg reader makes (:mod:`medseg.data.headers`): a declared size above the memory limit,
a file too short for the voxels it declares, NaN/zero voxel sizes or a broken sform/qform are reported without
reading a voxel, so a 165-byte file declaring 1000^3 voxels costs nothing. Other file endings (``.nrrd``,
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
from pathlib import Path

from medseg.data.checks import CheckOptions, Problem, check_case, geometry_difference, open_image
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

__all__ = ["Problem", "geometry_difference", "open_image", "validate_dataset"]  # the first three from .checks


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
        The problems, dataset-level ones first, then files in folder order, then cases in id order. When
        ``dataset.json`` itself is unusable only its problems are returned: without it the files cannot be
        interpreted (channels, file ending, labels).

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
    opts = CheckOptions(
        spacing_range_mm=tuple(spacing_range_mm),
        affine_tolerance=affine_tolerance,
        check_voxels=check_voxels,
        label_values=frozenset(info.labels.values()),
        num_channels=info.num_channels,
        layout=layout,
    )
    cases = list(_msd_cases(info, problems) if layout == "msd" else _nnunet_cases(info, problems))
    for case_id, images, label in cases:
        check_case(case_id, images, label, opts, problems)
    return problems
