"""Predictions on the preprocessed grid -> predictions on the input's native grid, by inverting the transforms.

The deterministic transforms (orientation to RAS, resampling to the target spacing, foreground crop) are recorded on
each case's ``image`` MetaTensor as ``applied_operations``. MONAI's ``Invertd`` replays them backwards onto a
prediction, which then has the input file's shape and affine. ``Invertd`` needs the very transform *instances* that
processed the case (``SegmentationDataModule.deterministic_transform``), not a rebuilt copy.

What is inverted, and how (the choice made here):

- **Class scores** (``K > 1`` channels: probabilities or logits) are resampled with the interpolation recorded for
  the image (bilinear), and the label map is their argmax on the native grid (:func:`native_label_map`). This is what
  nnU-Net does: boundaries follow the native resolution instead of the staircase of nearest-neighbour upsampling, and
  regions cropped away come back as zeros for every class, i.e. background after argmax. Use it by default.
- **Label maps** (one integer channel) are resampled with nearest-neighbour interpolation, which keeps label values
  exact. Use it when ``K`` native-size score volumes do not fit in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from medseg.inference.sliding import InferenceError

__all__ = ["native_label_map", "to_native"]


def _is_label_map(prediction: torch.Tensor) -> bool:
    return prediction.shape[0] == 1 and not torch.is_floating_point(prediction)


def to_native(
    prediction: torch.Tensor,
    item: Mapping[str, Any],
    transform: Compose,
    orig_key: str = "image",
    nearest: bool | None = None,
) -> MetaTensor:
    """Invert the deterministic transforms of ``item`` on ``prediction``, returning it on the native grid.

    Args:
        prediction: ``(K, X, Y, Z)`` scores or ``(1, X, Y, Z)`` label map on the grid of ``item[orig_key]`` (the
            preprocessed grid, e.g. from :func:`medseg.inference.predict_logits`).
        item: the case as the datamodule's ``dataset_for("val" | "test")`` gives it (one case, not a collated batch),
            whose ``item[orig_key]`` MetaTensor carries ``applied_operations``.
        transform: the ``Compose`` that processed the item (``datamodule.deterministic_transform``).
        orig_key: the key whose recorded operations are inverted.
        nearest: nearest-neighbour interpolation; default: for an integer one-channel label map only (see the
            module docstring). A label map is returned as ``int64``.

    Returns:
        MetaTensor ``(K or 1, *native_shape)`` whose ``affine`` is the input file's voxel-to-world affine (RAS+ mm).

    Raises:
        InferenceError: the item has no MetaTensor under ``orig_key``, or the prediction is not on its grid.
    """
    reference = item.get(orig_key)
    if not isinstance(reference, MetaTensor):
        raise InferenceError(
            f"item[{orig_key!r}] must be the MetaTensor the transforms produced (with applied_operations); got "
            f"{type(reference).__name__}. Pass one case from datamodule.dataset_for('val'|'test'), not a batch."
        )
    if prediction.ndim != reference.ndim or tuple(prediction.shape[1:]) != tuple(reference.shape[1:]):
        raise InferenceError(
            f"prediction of shape {tuple(prediction.shape)} is not on the grid of case {item.get('case_id', '?')!r}"
            f" ({tuple(reference.shape[1:])} voxels after preprocessing); predict on the transformed image."
        )
    label_map = _is_label_map(prediction)
    nearest = label_map if nearest is None else nearest
    values = prediction.detach()
    values = values.as_tensor() if isinstance(values, MetaTensor) else values
    data = {orig_key: reference, "pred": MetaTensor(values.float())}  # Invertd reads the trace only off MetaTensors
    inverted = Invertd(keys="pred", transform=transform, orig_keys=orig_key, nearest_interp=nearest)(data)["pred"]
    if label_map:
        inverted = MetaTensor(torch.round(inverted.as_tensor()).to(torch.int64), meta=inverted.meta)
    return inverted


def native_label_map(logits: torch.Tensor, item: Mapping[str, Any], transform: Compose) -> MetaTensor:
    """Integer label map ``(X, Y, Z)`` on the native grid from ``(K, X, Y, Z)`` logits on the preprocessed grid.

    Softmax probabilities are inverted with the image's interpolation and the argmax is taken on the native grid
    (the default path of the module docstring). The result's ``affine`` is the input file's.
    """
    if logits.ndim != 4 or logits.shape[0] < 2:
        raise InferenceError(f"native_label_map expects (K >= 2, X, Y, Z) logits, got shape {tuple(logits.shape)}.")
    probabilities = torch.softmax(logits.float(), dim=0)
    native = to_native(probabilities, item, transform, nearest=False)
    return MetaTensor(native.as_tensor().argmax(dim=0), meta=native.meta)
