"""``metadata.json``: what a user must know to feed the model and trust its numbers, in a MONAI bundle's spirit.

The keys follow MONAI bundle ``metadata.json`` where one exists (``version``, ``changelog``, ``monai_version``,
``pytorch_version``, ``task``, ``description``, ``data_source``, ``data_type``, ``intended_use``,
``network_data_format`` with ``inputs.image`` and ``outputs.pred``, ``eval_metrics``), and add medseg's: the input
format in words and numbers (``input_format``: modality, channels, orientation, spacing in mm, intensity
normalisation, slice or patch size in voxels), ``labels``, ``prompt_types``, ``training`` and ``training_data``,
``licence`` and ``limitations``. Every number is copied from the run's ``summary.json`` or the release config, never
typed in.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from typing import Any

__all__ = ["SCHEMA", "build_metadata", "describe_intensity", "input_format", "modality_of"]

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
        from medseg.data.transforms import resolve_window

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
    metrics = {
        "split": "test",
        "n_cases": summary.get("n_cases"),
        "foreground_mean": dict(summary.get("foreground_mean", {})),
        "per_class": {name: dict(values) for name, values in summary.get("mean", {}).items()},
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
