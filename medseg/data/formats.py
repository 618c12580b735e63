"""The two dataset layouts medseg reads: nnU-Net v2 raw folders and Medical Segmentation Decathlon (MSD) folders.

A dataset is a folder with a ``dataset.json`` and ``imagesTr/``, ``labelsTr/`` (and optionally ``imagesTs/``,
``labelsTs/``). The two layouts differ only in the JSON:

* **nnU-Net v2** (``channel_names``, ``labels`` as name -> value, ``numTraining``, ``file_ending``): cases are found
  from the file names in ``imagesTr/`` (``CASE_0000.nii.gz`` is channel 0 of case ``CASE``) and their labels are
  ``labelsTr/CASE.nii.gz``; see nnU-Net's ``documentation/dataset_format.md``.
* **MSD** (``modality``, ``labels`` as ``{"0": "background"}``, ``training`` list of image/label pairs, ``test``
  list): cases are the files the JSON lists; a multi-modal case is one 4D file holding all channels.

:func:`load_dataset_info` raises only when the JSON itself is unusable. Missing files are *recorded* (``label=None``,
fewer channel files) rather than raised, so that :func:`medseg.data.validate.validate_dataset` can report every
problem of a dataset in one pass.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.atomic import atomic_write_json
from medseg.data.nnunet_reader import nnunet_reader_fields
from medseg.errors import DatasetError
from medseg.paths import find_dataset

__all__ = ["CaseFiles", "DatasetInfo", "load_dataset_info", "write_dataset_json"]

DATASET_JSON = "dataset.json"
#: File endings recognised when MSD's dataset.json (which has no ``file_ending``) lists its files, longest first.
KNOWN_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".tif", ".tiff", ".png")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_NNUNET_REQUIRED = ("channel_names", "labels", "numTraining", "file_ending")
_MSD_REQUIRED = ("modality", "labels", "training")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case, as found on disk.

    Attributes:
        case_id: Identifier shared by the case's files (``CASE`` in ``CASE_0000.nii.gz``).
        images: One file per channel in channel order (nnU-Net ``CASE_0000``, ``CASE_0001``, ...); for MSD one file
            that holds all channels (4D when multi-modal). Only files that exist are listed, so a case with a missing
            channel has fewer entries than the dataset has channels.
        label: The segmentation file, or ``None`` when it is absent (e.g. ``imagesTs`` without ``labelsTs``).
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` declares and which case files exist.

    Attributes:
        root: The dataset folder.
        name: The folder name, e.g. ``Dataset990_Synthetic``.
        channel_names: Channel index -> name (``{0: "CT"}``); the name "CT" selects CT intensity normalisation.
        labels: Label name -> integer value, nnU-Net v2 orientation (``{"background": 0, "liver": 1}``).
        file_ending: Ending of every image and label file, e.g. ``.nii.gz``.
        training: Every training case, sorted by case id.
        test: Every case of ``imagesTs/`` (MSD: the ``test`` list); labels from ``labelsTs/`` when that folder exists.
        layout: ``"nnunetv2"`` or ``"msd"``.
        raw: ``dataset.json`` as read.
    """

    root: Path
    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str
    training: tuple[CaseFiles, ...]
    test: tuple[CaseFiles, ...]
    layout: str
    raw: dict = field(repr=False)

    @property
    def num_classes(self) -> int:
        """Number of distinct label values, background included (the output channels of a dense model)."""
        return len(set(self.labels.values()))

    @property
    def num_channels(self) -> int:
        """Number of input channels (modalities) every case has."""
        return len(self.channel_names)

    @property
    def foreground_labels(self) -> dict[str, int]:
        """The labels without background (value 0)."""
        return {name: value for name, value in self.labels.items() if value != 0}


# --- dataset.json --------------------------------------------------------------------------------------------------


def detect_layout(raw: dict) -> str:
    """``"msd"`` when the JSON uses MSD keys (``modality`` or a ``training`` list) and no ``channel_names``."""
    if "channel_names" not in raw and ("modality" in raw or isinstance(raw.get("training"), list)):
        return "msd"
    return "nnunetv2"


def read_dataset_json(json_path: Path) -> dict:
    """Read ``dataset.json``, raising :class:`DatasetError` (naming the file and the fix) when it cannot be used."""
    if not json_path.is_file():
        raise DatasetError(
            f"{json_path}: file not found. Every dataset folder needs a dataset.json; write one with "
            f"medseg.data.formats.write_dataset_json or convert a download with `medseg convert`."
        )
    try:
        raw = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(
            f"{json_path}: not valid JSON ({err}). Fix the syntax, e.g. check it with `python -m json.tool`."
        ) from err
    if not isinstance(raw, dict):
        raise DatasetError(f"{json_path}: the top level must be a JSON object {{...}}, not {type(raw).__name__}.")
    return raw


def check_dataset_json(raw: dict) -> list[tuple[str, str, str]]:
    """Every problem of a parsed ``dataset.json``, as ``(field, message, fix)``; empty when it is usable.

    Collected rather than raised one at a time, so that the validator can list all of them at once.
    """
    layout = detect_layout(raw)
    required = _MSD_REQUIRED if layout == "msd" else _NNUNET_REQUIRED
    issues = [
        (key, f"required field '{key}' is missing ({layout} layout)", f'add "{key}" to dataset.json')
        for key in required
        if key not in raw
    ]
    channel_key = "modality" if layout == "msd" else "channel_names"
    if channel_key in raw:
        issues += _check_channels(raw[channel_key], channel_key)
    if "labels" in raw:
        issues += _check_labels(raw["labels"], inverted=layout == "msd")
    if "regions_class_order" in raw:
        issues.append(_regions_issue())
    if "numTraining" in raw:
        value = raw["numTraining"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            issues.append(
                (
                    "numTraining",
                    f"must be a non-negative integer, got {value!r}",
                    "set it to the number of training cases",
                )
            )
    if "file_ending" in raw:
        value = raw["file_ending"]
        if not isinstance(value, str) or not value.startswith(".") or len(value) < 2:
            issues.append(
                (
                    "file_ending",
                    f'must be a file ending such as ".nii.gz", got {value!r}',
                    'set "file_ending": ".nii.gz" (or your files\' ending)',
                )
            )
    if layout == "msd":
        for key in ("training", "test"):
            if key in raw:
                issues += _check_msd_list(raw[key], key)
    return issues


def _check_channels(value: Any, key: str) -> list[tuple[str, str, str]]:
    fix = 'write it as {"0": "CT"} or {"0": "T2", "1": "ADC"}: keys 0, 1, ... in channel order, values names'
    if not isinstance(value, dict) or not value:
        return [(key, f"must be a non-empty object of channel index -> name, got {value!r}", fix)]
    try:
        indices = sorted(int(k) for k in value)
    except (TypeError, ValueError):
        return [(key, f"keys must be channel indices 0, 1, ..., got {list(value)}", fix)]
    if indices != list(range(len(indices))):
        return [(key, f"channel indices must be 0..{len(indices) - 1} without gaps, got {indices}", fix)]
    if not all(isinstance(v, str) for v in value.values()):
        return [(key, f"channel names must be strings, got {list(value.values())}", fix)]
    return []


def _regions_issue() -> tuple[str, str, str]:
    return (
        "labels",
        "region-based labels (a label mapped to a list of values, or 'regions_class_order') are not supported yet",
        "convert the regions to one integer value per class (e.g. BraTS: 1 necrosis, 2 edema, 3 enhancing)",
    )


def _check_labels(value: Any, inverted: bool) -> list[tuple[str, str, str]]:
    example = '{"0": "background", "1": "liver"}' if inverted else '{"background": 0, "liver": 1}'
    fix = f"write it as {example}"
    if not isinstance(value, dict) or not value:
        return [("labels", f"must be a non-empty object, got {value!r}", fix)]
    if inverted:
        try:
            pairs = [(str(name), int(key)) for key, name in value.items()]
        except (TypeError, ValueError):
            return [("labels", f"MSD keys must be integer values, got {list(value)}", fix)]
    else:
        if any(isinstance(v, (list, tuple)) for v in value.values()):
            return [_regions_issue()]
        pairs = list(value.items())
        bad = {name: v for name, v in pairs if isinstance(v, bool) or not isinstance(v, int)}
        if bad:
            return [("labels", f"values must be integers, got {bad}", fix)]
    values = [v for _, v in pairs]
    if any(v < 0 for v in values):
        return [("labels", f"values must be >= 0, got {sorted(values)}", fix)]
    if len(set(values)) != len(values):
        return [("labels", f"two labels share a value: {dict(pairs)}", "give every label its own value")]
    if 0 not in values:
        return [("labels", "no label has the value 0 (background)", 'add "background": 0')]
    return []


def _check_msd_list(value: Any, key: str) -> list[tuple[str, str, str]]:
    if not isinstance(value, list):
        return [(key, f"must be a list, got {type(value).__name__}", f'write "{key}": [...]')]
    for entry in value:
        if key == "training" and not (isinstance(entry, dict) and isinstance(entry.get("image"), str)):
            return [(key, f'entries must be {{"image": ..., "label": ...}}, got {entry!r}', "list one object per case")]
        if key == "test" and not (
            isinstance(entry, str) or (isinstance(entry, dict) and isinstance(entry.get("image"), str))
        ):
            return [(key, f"entries must be file paths, got {entry!r}", 'list paths such as "./imagesTs/x.nii.gz"')]
    return []


def parse_labels(raw: dict) -> dict[str, int]:
    """``labels`` in nnU-Net v2 orientation (name -> value), inverting MSD's value -> name; sorted by value."""
    labels = raw["labels"]
    pairs = [(str(n), int(k)) for k, n in labels.items()] if detect_layout(raw) == "msd" else list(labels.items())
    return dict(sorted(pairs, key=lambda pair: pair[1]))


def write_dataset_json(
    root: Path,
    channel_names: dict[int, str],
    labels: dict[str, int],
    num_training: int,
    file_ending: str = ".nii.gz",
    **extra: Any,
) -> Path:
    """Write an nnU-Net v2 ``dataset.json`` into ``root`` atomically (a temporary file renamed into place).

    Atomic so that a crash never leaves a half-written JSON that would make the dataset unreadable.

    Args:
        root: Dataset folder; created if missing.
        channel_names: Channel index -> name, e.g. ``{0: "CT"}``.
        labels: Label name -> value, e.g. ``{"background": 0, "liver": 1}``.
        num_training: Number of training cases.
        file_ending: Ending of every image and label file.
        **extra: Other fields to store (``name``, ``description``, ``reference``, ``licence``...). Unless given,
            nnU-Net's reader key is added when cases are not all RAS (:mod:`medseg.data.nnunet_reader`).

    Returns:
        The path of the written file.

    Raises:
        DatasetError: the arguments would not make a valid dataset.json.
    """
    root = Path(root)
    data = {
        "channel_names": {str(k): v for k, v in sorted(channel_names.items())},
        "labels": dict(labels),
        "numTraining": num_training,
        "file_ending": file_ending,
        **nnunet_reader_fields(root, file_ending),
        **extra,
    }
    issues = check_dataset_json(data)
    if issues:
        raise DatasetError(_issue_text(root / DATASET_JSON, issues))
    root.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(root / DATASET_JSON, data, indent=4)


def _issue_text(json_path: Path, issues: list[tuple[str, str, str]]) -> str:
    return f"{json_path}: " + "; ".join(f"field '{f}': {message}. Fix: {fix}" for f, message, fix in issues)


# --- case discovery ------------------------------------------------------------------------------------------------


def split_channel_name(file_name: str, file_ending: str) -> tuple[str, int] | None:
    """``("CASE", 1)`` for ``CASE_0001{file_ending}``; ``None`` when the name does not follow that pattern."""
    if not file_name.endswith(file_ending) or file_name.startswith("."):
        return None
    match = _CHANNEL_RE.match(file_name[: -len(file_ending)])
    return (match["case"], int(match["channel"])) if match else None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def discover_cases(
    images_dir: Path, labels_dir: Path | None, file_ending: str, num_channels: int
) -> tuple[CaseFiles, ...]:
    """Group ``images_dir`` files named ``CASE_XXXX{file_ending}`` into cases sorted by id, pairing labels by name.

    Channel files whose index is not below ``num_channels`` are not part of a case (the validator reports them).
    """
    channels: dict[str, dict[int, Path]] = {}
    for path in _files(images_dir):
        parsed = split_channel_name(path.name, file_ending)
        if parsed is not None:
            channels.setdefault(parsed[0], {})[parsed[1]] = path
    cases = []
    for case_id in sorted(channels):
        images = tuple(channels[case_id][c] for c in range(num_channels) if c in channels[case_id])
        label = labels_dir / f"{case_id}{file_ending}" if labels_dir is not None else None
        cases.append(CaseFiles(case_id, images, label if label is not None and label.is_file() else None))
    return tuple(cases)


def strip_ending(file_name: str, file_ending: str | None = None) -> str:
    """The file name without its (known or given) ending: ``la_003`` for ``la_003.nii.gz``."""
    for ending in (file_ending,) if file_ending else KNOWN_ENDINGS:
        if file_name.endswith(ending):
            return file_name[: -len(ending)]
    return Path(file_name).stem


def _msd_case(root: Path, image: str, label: str | None, file_ending: str) -> CaseFiles:
    image_path = (root / image).resolve()
    label_path = (root / label).resolve() if label else None
    return CaseFiles(
        strip_ending(image_path.name, file_ending),
        (image_path,) if image_path.is_file() else (),
        label_path if label_path is not None and label_path.is_file() else None,
    )


def _msd_file_ending(raw: dict) -> str:
    if isinstance(raw.get("file_ending"), str):
        return raw["file_ending"]
    for entry in raw.get("training", []):
        for ending in KNOWN_ENDINGS:
            if entry["image"].endswith(ending):
                return ending
    return ".nii.gz"


def load_dataset_info(path: str | os.PathLike[str]) -> DatasetInfo:
    """Read a dataset's ``dataset.json`` and find its case files.

    Args:
        path: The dataset folder, its ``dataset.json``, or a name resolved by :func:`medseg.paths.find_dataset`
            (``Dataset990_Synthetic``, ``990``, ``synthetic``).

    Returns:
        The dataset's declaration and files. Missing labels or channel files are recorded, not raised.

    Raises:
        DatasetError: the dataset is not found, or its ``dataset.json`` is missing, not JSON, lacks a required field
            or has a bad value; the message names the file and field and says how to fix it.
    """
    path = Path(path)
    root = path.parent.resolve() if path.name == DATASET_JSON and path.is_file() else find_dataset(path)
    json_path = root / DATASET_JSON
    raw = read_dataset_json(json_path)
    issues = check_dataset_json(raw)
    if issues:
        raise DatasetError(_issue_text(json_path, issues))
    layout = detect_layout(raw)
    labels = parse_labels(raw)
    if layout == "msd":
        channel_names = {int(k): v for k, v in sorted(raw["modality"].items(), key=lambda kv: int(kv[0]))}
        file_ending = _msd_file_ending(raw)
        training = tuple(_msd_case(root, e["image"], e.get("label"), file_ending) for e in raw["training"])
        labels_ts = root / "labelsTs"
        test = []
        for entry in raw.get("test", []):
            image = entry if isinstance(entry, str) else entry["image"]
            label = entry.get("label") if isinstance(entry, dict) else None
            if label is None and labels_ts.is_dir():
                label = str(labels_ts / Path(image).name)
            test.append(_msd_case(root, image, label, file_ending))
        training = tuple(sorted(training, key=lambda case: case.case_id))
        test = tuple(sorted(test, key=lambda case: case.case_id))
    else:
        channel_names = {int(k): v for k, v in sorted(raw["channel_names"].items(), key=lambda kv: int(kv[0]))}
        file_ending = raw["file_ending"]
        n = len(channel_names)
        training = discover_cases(root / "imagesTr", root / "labelsTr", file_ending, n)
        labels_ts = root / "labelsTs"
        test = discover_cases(root / "imagesTs", labels_ts if labels_ts.is_dir() else None, file_ending, n)
    return DatasetInfo(
        root=root,
        name=root.name,
        channel_names=channel_names,
        labels=labels,
        file_ending=file_ending,
        training=training,
        test=tuple(test),
        layout=layout,
        raw=raw,
    )
