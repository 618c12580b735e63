"""``metadata.json``: what a user must know to feed the model and trust its numbers, in a MONAI bundle's spirit.

The keys follow MONAI bundle ``metadata.json`` where one exists (``version``, ``changelog``, ``monai_version``,
``pytorch_version``, ``task``, ``description``, ``data_source``, ``data_type``, ``intended_use``,
``network_data_format`` with ``inputs.image`` and ``outputs.pred``, ``eval_metrics``), and add medseg's: the input
format in words and numbers (``input_format``: modality, channels, orientation, spacing in mm, intensity
normalisation, slice or patch size in voxels), ``labels``, ``prompt_types``, ``training`` and ``training_data``,
``licence`` and ``limitations``. Every number is copied from the run's ``summary.json`` or the release config, never
typed in.

``medseg verify`` reads it back (:func:`read_metadata`) and compares every fact it states with ``config.yaml``, the
file that actually builds the model (:func:`metadata_contradictions`): a card that describes another model than the
one shipped is a failed release, even when every checksum matches.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from medseg.data.transforms import resolve_window
from medseg.errors import ConfigError
from medseg.evaluation import medseg_metrics

__all__ = [
    "SCHEMA",
    "build_metadata",
    "describe_intensity",
    "input_format",
    "metadata_contradictions",
    "modality_of",
    "read_metadata",
]

SCHEMA = "medseg-release-metadata/1"


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def modality_of(channels: Mapping[str, str]) -> str:
    """``CT`` when every channel is named CT (nnU-Net's convention), ``MR`` otherwise."""
    names = [str(v).upper() for v in channels.values()]
    return "CT" if names and all(n == "CT" for n in names) else "MR"


def _find(transforms: list[Mapping[str, Any]], suffix: str) -> Mapping[str, Any] | None:
    return next((t for t in transforms if str(t.get("_target_", "")).endswith(suffix)), None)


def describe_intensity(transforms: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The intensity normalisation of a preprocessing list, as numbers and one sentence."""
    ct = _find(transforms, ".CTWindowd")
    if ct is not None:
        level, width = resolve_window(ct.get("window", "abdomen"))
        return {
            "method": "ct_window", "window": ct.get("window"), "level_hu": level, "width_hu": width,
            "output_range": [ct.get("b_min", 0.0), ct.get("b_max", 1.0)],
            "text": f"HU clipped to the window level {level:g} / width {width:g} HU and scaled to [0, 1]",
        }  # fmt: skip
    mr = _find(transforms, ".ForegroundZScored")
    if mr is not None:
        mode, lower, upper = mr.get("mode", "zscore"), mr.get("lower", 0.5), mr.get("upper", 99.5)
        threshold = mr.get("threshold", 0.0)
        after = "scaled to [0, 1]" if mode == "minmax" else "z-scored over the foreground"
        return {
            "method": f"foreground_percentile_{mode}", "lower_percentile": lower, "upper_percentile": upper,
            "foreground_threshold": threshold,
            "text": f"each channel clipped to its foreground's (> {threshold:g}) percentiles {lower:g}-{upper:g}, "
            f"then {after}",
        }  # fmt: skip
    names = [str(t.get("_target_", "?")).rsplit(".", 1)[-1] for t in transforms]
    return {"method": "custom", "text": f"as the preprocessing transforms do: {', '.join(names)}"}


def input_format(config: Mapping[str, Any]) -> dict[str, Any]:
    """Modality, channels, orientation, spacing (mm), intensity normalisation and model input size of a release."""
    transforms = list(config["data"]["preprocess"]["transforms"])
    orientation = _find(transforms, ".Orientationd")
    spacing = _find(transforms, ".Spacingd")
    crop = _find(transforms, ".CropForegroundd")
    inference = dict(config["task"]["inference"])
    channels = dict(config.get("channels", {}))
    slice_axis = inference.get("slice_axis")
    two_d = int(config["model"].get("spatial_dims", 2 if slice_axis is not None else 3)) == 2
    roi = inference.get("roi_size")
    return {
        "modality": modality_of(channels),
        "channels": channels,
        "num_channels": len(channels) or int(config["model"].get("in_channels", 1)),
        "file_formats": ["NIfTI (.nii, .nii.gz)", "DICOM series folder"],
        "orientation": orientation.get("axcodes") if orientation else None,
        "spacing_mm": [float(s) for s in spacing["pixdim"]] if spacing else None,
        "foreground_crop": {"margin_voxels": crop.get("margin")} if crop else None,
        "intensity": describe_intensity(transforms),
        "dimensions": "2d_slices" if two_d else "3d_patches",
        "slice_axis": slice_axis if two_d else None,
        "slice_size_px": roi if two_d else None,
        "patch_size_voxels": None if two_d else roi,
        "note": "Give the image as acquired: medseg applies this preprocessing itself and writes the prediction "
        "on the input's own grid (shape and affine).",
    }


def build_metadata(
    config: Mapping[str, Any],
    summary: Mapping[str, Any],
    dataset: Mapping[str, Any],
    *,
    changelog: Mapping[str, str],
    licence: str,
    description: str,
    intended_use: str,
    limitations: list[str],
    training: Mapping[str, Any],
    example: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``metadata.json`` dictionary (see the module docstring).

    Args:
        config: the release config (``config.yaml`` as a dict).
        summary: the run's ``summary.json``.
        dataset: the run's ``dataset.json``.
        changelog: ``{version: change}``, newest first.
        licence: SPDX identifier of the weights' licence.
        description, intended_use: one paragraph each.
        limitations: sentences.
        training: how the model was trained (backbone, adapter, steps, trainable parameters...).
        example: ``example/example.json``.
    """
    labels = dict(config["labels"])
    fmt = input_format(config)
    view = medseg_metrics(summary)  # medseg's metric names (dice, hd95, nsd) per class name
    metrics = {
        "split": "test",
        "n_cases": summary.get("n_cases"),
        "foreground_mean": dict(view.get("foreground_mean", {})),
        "per_class": {name: dict(values) for name, values in view.get("mean", {}).items()},
        "evaluated_on": "native grid of each test case (medseg evaluate), whole volumes",
        "empty_label_policy": summary.get("empty_label_policy"),
    }
    return {
        "schema": SCHEMA,
        "name": config["name"],
        "version": config["version"],
        "changelog": dict(changelog),
        "medseg_version": _version("medseg"),
        "monai_version": _version("monai"),
        "pytorch_version": _version("torch"),
        "safetensors_version": _version("safetensors"),
        "python_version": platform.python_version(),
        "task": "semantic segmentation (dense, multi-class)",
        "description": description,
        "weights": {k: v for k, v in dict(config["weights"]).items()},
        "input_format": fmt,
        "labels": labels,
        "prompt_types": [],
        "prompt_note": "prompt-free: every voxel is classified; no points, boxes or masks are taken",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if fmt["modality"] == "CT" else "magnitude",
                    "modality": fmt["modality"],
                    "num_channels": fmt["num_channels"],
                    "dtype": "float32",
                    "channel_def": fmt["channels"],
                    "spacing_mm": fmt["spacing_mm"],
                },
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 1,
                    "dtype": "uint8",
                    "label_def": {str(v): k for k, v in labels.items()},
                },
            },
        },
        "eval_metrics": metrics,
        "training": dict(training),
        "training_data": {
            "dataset": summary.get("dataset") or dataset.get("name"),
            "description": dataset.get("description"),
            "reference": dataset.get("reference"),
            "licence": dataset.get("licence") or dataset.get("license"),
            "fold": summary.get("fold"),
            "label_fraction": summary.get("label_fraction"),
            "num_train_cases": summary.get("num_train_cases"),
            "num_val_cases": summary.get("num_val_cases"),
            "num_test_cases": summary.get("num_test_cases"),
        },
        "data_type": "nifti",
        "licence": licence,
        "intended_use": intended_use,
        "limitations": list(limitations),
        "example": dict(example),
    }


def read_metadata(path: str | Path) -> dict[str, Any]:
    """``metadata.json`` as a dict.

    Raises:
        ConfigError: the file is missing, not UTF-8 JSON, or not a JSON object; the message names it.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: a medseg release describes itself there; re-export it.") from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path} is not JSON ({err.msg}, line {err.lineno} column {err.colno}); re-export or re-download the "
            f"release."
        ) from None
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(
            f"{path} cannot be read as UTF-8 JSON ({err}); re-export or re-download the release."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not the object medseg writes; re-export it.")
    return data


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON data, floats within 1e-6 (YAML and JSON may print one number differently)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(map(str, a)) == set(map(str, b)) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def metadata_contradictions(metadata: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """The facts ``metadata.json`` states differently from ``config.yaml`` (the file that builds the model), each
    naming both values; empty when they agree.

    Checked: name, version, labels (and the output's ``label_def``), the number of classes, weights (mode, base),
    the backbone, and the input format derived from the preprocessing (spacing, orientation, channels, modality,
    slice or patch size, intensity method). Card texts are not compared: they are prose, not facts the model uses.
    """
    problems: list[str] = []

    def compare(what: str, stated: Any, built: Any) -> None:
        if not _same(stated, built):
            problems.append(f"{what}: metadata.json says {stated!r}, config.yaml says {built!r}")

    def get(*keys: str) -> Any:
        node: Any = metadata
        for key in keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        return node

    labels = {str(k): int(v) for k, v in dict(config["labels"]).items()}
    compare("name", metadata.get("name"), config.get("name"))
    compare("version", metadata.get("version"), config.get("version"))
    compare("labels", metadata.get("labels"), labels)
    compare(
        "label_def", get("network_data_format", "outputs", "pred", "label_def"), {str(v): k for k, v in labels.items()}
    )
    model = dict(config.get("model") or {})
    classes = model.get("num_classes", len(labels))
    stated = metadata.get("labels")
    compare("number of classes", len(stated) if isinstance(stated, Mapping) else stated, classes)
    compare("weights", metadata.get("weights"), dict(config["weights"]))
    if "backbone" in model:
        compare("backbone", get("training", "backbone"), model["backbone"])
    try:
        built = input_format(config)
    except (KeyError, TypeError, ValueError) as err:
        problems.append(f"config.yaml's preprocessing cannot be described ({type(err).__name__}: {err})")
        return problems
    for key in ("modality", "channels", "num_channels", "orientation", "spacing_mm", "dimensions", "slice_axis",
                "slice_size_px", "patch_size_voxels"):  # fmt: skip
        compare(f"input_format.{key}", get("input_format", key), built[key])
    compare("input_format.intensity.method", get("input_format", "intensity", "method"), built["intensity"]["method"])
    compare("inputs.image.spacing_mm", get("network_data_format", "inputs", "image", "spacing_mm"), built["spacing_mm"])
    return problems
