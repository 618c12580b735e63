"""Prompt-free (dense) prediction of one raw volume: training's preprocessing, whole-volume logits, native grid.

The same path as ``medseg evaluate`` (:func:`medseg.workflows.evaluation.evaluate_model`) for an image that belongs
to no dataset: the run's deterministic transforms (orientation, spacing, crop, intensity) are applied to the image as
read, the model predicts the whole preprocessed volume (slice by slice or by sliding window,
:func:`medseg.inference.predict_logits`, with the run's ``task.inference`` settings), the softmax probabilities are
taken back through the inverse transforms onto the input's grid (:func:`medseg.inference.to_native`, bilinear) and the
label map is their argmax there.

Test-time augmentation (``tta=True``) mirrors the volume as nnU-Net does and averages the logits of every mirrored
prediction (flipped back) before the softmax: all 8 combinations of the three spatial axes for a 3D model, the 4
in-plane combinations for a 2D model (mirroring along its slice axis would change nothing).

Probabilities on the native grid. Regions the preprocessing cropped away come back with zero probability for every
class; that missing mass is given to the background (class 0), so each voxel's probabilities sum to one.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from omegaconf import OmegaConf

from medseg.data.transforms import build_transforms
from medseg.errors import ConfigError
from medseg.inference.loaded import LoadedModel
from medseg.inference.native import to_native
from medseg.inference.sliding import predict_logits

__all__ = ["DensePrediction", "foreground_threshold", "mirror_axes", "predict_dense", "preprocessing_of"]


@dataclass
class DensePrediction:
    """Attributes: ``labels`` ``(X, Y, Z)`` int64 on the input's grid; ``probabilities`` ``(K, X, Y, Z)`` float32
    class probabilities there (each voxel sums to 1); ``class_values`` the label value of each of the ``K`` channels."""

    labels: np.ndarray
    probabilities: np.ndarray
    class_values: list[int]


def preprocessing_of(loaded: LoadedModel) -> Compose:
    """The deterministic transforms of ``loaded.config.data.preprocess`` (without a loader), built anew.

    Build it once per image: MONAI's ``Invertd`` needs the very instance that processed the image.
    """
    data = loaded.config.get("data") or {}
    node = data.get("preprocess") if hasattr(data, "get") else None
    if node is None:
        raise ConfigError(f"model {loaded.source or '?'} has no data.preprocess in its config; cannot preprocess.")
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        node = node.get("transforms") or []
    return Compose(build_transforms(list(node)))


def foreground_threshold(loaded: LoadedModel) -> float | None:
    """The threshold of the MRI normalisation (``ForegroundZScored``) in ``loaded``'s preprocessing, else ``None``.

    Such a model cannot take an image without contrast above it (:func:`medseg.inference.cases.check_contrast`).
    """
    data = loaded.config.get("data") if loaded.config is not None else None
    node = data.get("preprocess") if hasattr(data, "get") else None
    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    node = node.get("transforms") if isinstance(node, Mapping) else node
    for item in node or []:
        if isinstance(item, Mapping) and str(item.get("_target_", "")).endswith(".ForegroundZScored"):
            return float(item.get("threshold", 0.0))
    return None


def mirror_axes(spatial_dims: int, slice_axis: int | None) -> list[tuple[int, ...]]:
    """Spatial axes (0-2 of ``(X, Y, Z)``) of every mirrored copy, the identity ``()`` first (nnU-Net's set)."""
    axes = [0, 1, 2] if spatial_dims == 3 else [a for a in (0, 1, 2) if a != (2 if slice_axis is None else slice_axis)]
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def _inference_settings(loaded: LoadedModel) -> dict[str, Any]:
    task = loaded.config.get("task") or {}
    settings = task.get("inference") if hasattr(task, "get") else None
    settings = OmegaConf.to_container(settings, resolve=True) if OmegaConf.is_config(settings) else settings
    settings = dict(settings or {})
    if settings.get("roi_size") is None:
        raise ConfigError(f"model {loaded.source or '?'}: task.inference.roi_size is missing; it is the training size.")
    if settings.get("slice_axis") is None:
        settings.pop("slice_axis", None)
    settings.pop("precision", None)  # the run's evaluation precision; predict's own --precision decides here
    return settings


def _logits(
    model: torch.nn.Module, image: torch.Tensor, settings: Mapping[str, Any], tta: bool, progress: bool, precision: str
):
    spatial_dims = int(getattr(model, "spatial_dims", 3))
    combos = mirror_axes(spatial_dims, settings.get("slice_axis")) if tta else [()]
    total = None
    for axes in combos:
        dims = [a + 1 for a in axes]  # (C, X, Y, Z): spatial axis a is tensor dim a + 1
        flipped = image.flip(dims) if dims else image
        logits = predict_logits(
            model, flipped, spatial_dims=spatial_dims, progress=progress, precision=precision, **settings
        )
        logits = logits.flip(dims) if dims else logits
        total = logits if total is None else total + logits
    return total / len(combos)


@torch.inference_mode()
def predict_dense(
    loaded: LoadedModel, image: MetaTensor, tta: bool = False, progress: bool = False, precision: str = "auto"
) -> DensePrediction:
    """Label map and class probabilities of one raw image on its own grid (module docstring).

    Args:
        loaded: a ``dense`` model with ``config.data.preprocess`` and ``config.task.inference``.
        image: ``(C, X, Y, Z)`` as :func:`medseg.data.io.load_image` reads it (affine in RAS+ mm).
        tta: average the logits of mirrored copies (nnU-Net's test-time augmentation).
        progress: show a progress bar over slices or windows.
        precision: ``auto`` (bf16 autocast on a GPU, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``
            (:mod:`medseg.inference.precision`).

    Raises:
        ConfigError: a model that is not dense, or a config without preprocessing or inference settings.
    """
    if loaded.kind != "dense":
        raise ConfigError(f"predict_dense needs a dense (prompt-free) model; {loaded.source} is {loaded.kind}.")
    settings = _inference_settings(loaded)
    transform = preprocessing_of(loaded)
    item = transform({"image": image})
    preprocessed = item["image"]
    plain = preprocessed.as_tensor() if isinstance(preprocessed, MetaTensor) else torch.as_tensor(preprocessed)
    logits = _logits(loaded.model, plain.float(), settings, tta, progress, precision)
    probabilities = torch.softmax(logits.float(), dim=0)
    native = to_native(probabilities, item, transform, nearest=False).as_tensor().float().clamp_(0.0, 1.0)
    native[0] += (1.0 - native.sum(dim=0)).clamp_min(0.0)  # cropped-away regions are background
    native /= native.sum(dim=0, keepdim=True)
    labels = native.argmax(dim=0)
    values = _class_values(loaded, native.shape[0])
    if values != list(range(native.shape[0])):
        labels = torch.as_tensor(values)[labels]
    return DensePrediction(labels.cpu().numpy(), native.cpu().numpy().astype(np.float32), values)


def _class_values(loaded: LoadedModel, count: int) -> list[int]:
    """Label value of each output channel: ``label_names``' values in order when they match in number, else 0..K-1."""
    values: Sequence[int] = sorted(int(v) for v in loaded.label_names)
    return list(values) if len(values) == count else list(range(count))
