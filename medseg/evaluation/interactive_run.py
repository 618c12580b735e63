"""Interactive evaluation of a 2-D promptable model on one test case, on the case's native voxel grid.

The simulated user (:mod:`medseg.evaluation.interactive`) clicks on the *native* reference, so every Dice is measured
on the grid of the files, never on the resampled training grid. Per case:

1. the image and reference are read as stored and prepared as ``medseg predict`` prepares an image
   (:func:`medseg.inference.prepared.prepare_volume`): the run's deterministic *intensity* transforms (CT window, MR
   percentiles; resampling and cropping are left out), then both reoriented to RAS by axis permutation and flips only
   (no interpolation), so that slices along ``slice_axis`` are the planes the model was trained on;
2. per object (a present class, or one connected component of it), on the object's middle slice along
   ``slice_axis`` (the slice :func:`~medseg.evaluation.interactive.middle_slice_box` takes): Dice after 1..k clicks,
   NoC@85/90 and the Dice of the tight box, with the LiteMedSAM slice recipe of :mod:`medseg.inference.recipe`
   (resize longest side, min-max to [0, 1], pad; :func:`~medseg.inference.recipe.slice_predictor`), the model's own
   previous logits as mask prompt between clicks, and SAM's multi-mask choice for a lone click;
3. the object is propagated through the volume from one box on that slice (:func:`medseg.inference.propagate`), and
   its Dice scored; the propagated objects, painted into one label map and brought back to the native orientation,
   are the case's prediction (``predictions/CASE.nii.gz``) that the usual per-class metrics score.

Every slice is encoded once per case (:class:`~medseg.inference.cache.EmbeddingCache`), whatever the number of clicks
and objects.

A SAM 2 / MedSAM2 model (a run whose model holds ``sam2``) goes through the same steps with SAM 2's own machinery:
the case's slices are SAM 2 frames (the run's intensities min-max scaled over the whole volume,
:class:`~medseg.inference.sam2_frames.Sam2Frames`, shared by the objects), the clicks of step 2 are SAM 2 on the one
middle slice with its previous logits as mask input (:func:`~medseg.inference.sam2_propagation.slice_predictor_sam2`),
and step 3 carries the box through the volume by memory (:func:`~medseg.inference.sam2_propagation.propagate_sam2`),
with the same stop rules.

A 3-D (volumetric) model is evaluated in 3-D instead (:func:`evaluate_case_3d`): the simulated user clicks on the
whole native volume (RAS-permuted, as above), each round runs :func:`medseg.inference.volumetric.volume_predictor`
(sliding windows of the model's ``roi_size``, prompts mapped into each window) with every click so far and the
previous round's logits as mask prompt, and the box Dice comes from the object's tight 3-D box. The volume is min-max
scaled to [0, 1] per channel, as training scales each patch, and, when the run resamples to a target spacing (its
``Spacingd``), zoomed to that spacing for the model so windows see the training scale; clicks and boxes are mapped
to the zoomed grid and the logits zoomed back, so every Dice is still on the native voxels. Propagation Dice is a
2-D-model metric (one box carried slice by slice) and is ``null`` for 3-D models; the case's label map holds each
object's mask from its box prompt.

``task.evaluation.protocol=segfm3d`` replaces this protocol by the CVPR 2025 challenge's (one box, five clicks, DSC
and NSD AUC; :mod:`medseg.evaluation.segfm3d_run`) on the same native cases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.data.io import load_case, load_image
from medseg.errors import ConfigError
from medseg.evaluation.interactive import (
    evaluate_object,
    interactive_objects,
    middle_slice_box,
    propagation_dice,
)
from medseg.evaluation.metrics import foreground_classes
from medseg.evaluation.segfm3d import Segfm3dSettings
from medseg.inference.cache import EmbeddingCache
from medseg.inference.prepared import PreparedVolume, model_grid, prepare_volume
from medseg.inference.propagate import PropagationConfig, propagate
from medseg.inference.recipe import SliceRecipe, minmax_per_image, slice_predictor
from medseg.inference.sam2_frames import Sam2Frames, is_sam2_model, unit_volume
from medseg.inference.sam2_propagation import propagate_sam2, slice_predictor_sam2
from medseg.inference.volumetric import volume_predictor
from medseg.prompts.contract import Prompts
from medseg.prompts.geometry import prompts_on_slice
from medseg.prompts.simulate import box_from_mask

__all__ = [
    "PROTOCOLS",
    "InteractiveSettings",
    "NativeCase",
    "evaluate_case",
    "evaluate_case_3d",
    "load_native_case",
]

PROTOCOLS = ("dice_at_k", "segfm3d")
"""Interactive protocols of ``task.evaluation.protocol``: this module's (the default) and the CVPR 2025 challenge's."""

_RECIPE = SliceRecipe(intensity="none")  # intensities come from the run's own transforms; slices are min-maxed


@dataclass(frozen=True)
class InteractiveSettings:
    """What the interactive evaluation of a promptable run does (``task.evaluation`` in the config).

    Attributes:
        max_clicks: clicks simulated per object, and the NoC cap.
        dice_k: Dice@1..dice_k are reported.
        max_objects: objects evaluated per case (``None``: all), in class order.
        max_cases: test cases evaluated (``None``: all).
        object_mode: ``class`` or ``component``.
        box_jitter: jitter of the box-Dice prompt (fraction of the side; 0 = the tight box).
        multimask: a lone click gets SAM's best-of-three mask.
        propagation: :class:`~medseg.inference.propagate.PropagationConfig` fields (not ``axis``), or ``None`` to
            skip propagation (the case's label map then holds each object's box mask on its middle slice only).
        protocol: ``dice_at_k`` (this module's: Dice@k, NoC, box and propagation Dice) or ``segfm3d`` (the CVPR 2025
            challenge's box + 5 clicks, :mod:`medseg.evaluation.segfm3d`; ``max_objects`` and ``propagation``
            apply to it too, ``object_mode`` and the click settings do not).
        segfm3d: the segfm3d protocol's options (:class:`~medseg.evaluation.segfm3d.Segfm3dSettings` fields).
    """

    max_clicks: int = 20
    dice_k: int = 10
    max_objects: int | None = None
    max_cases: int | None = None
    object_mode: str = "class"
    box_jitter: float = 0.0
    multimask: bool = True
    propagation: Mapping[str, Any] | None = field(default_factory=dict)
    protocol: str = "dice_at_k"
    segfm3d: Mapping[str, Any] | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> InteractiveSettings:
        """Settings from ``task.evaluation``; an unknown key is a :class:`ConfigError` naming the known ones."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"task.evaluation has unknown keys {unknown}; known: {sorted(known)}.")
        settings = cls(**values)
        if settings.dice_k > settings.max_clicks:
            raise ConfigError(f"task.evaluation.dice_k ({settings.dice_k}) exceeds max_clicks ({settings.max_clicks}).")
        if settings.protocol not in PROTOCOLS:
            raise ConfigError(f"task.evaluation.protocol must be one of {list(PROTOCOLS)}, got {settings.protocol!r}.")
        Segfm3dSettings.from_mapping(settings.segfm3d)  # its own keys are checked before any case runs
        return settings


@dataclass
class NativeCase:
    """One test case on its native voxels, reoriented to RAS (see the module docstring).

    Attributes:
        case_id: the case's name.
        volume: the prepared image (:class:`~medseg.inference.prepared.PreparedVolume`).
        label: ``(X, Y, Z)`` integer reference on the same RAS grid.
    """

    case_id: str
    volume: PreparedVolume
    label: np.ndarray

    @property
    def image(self) -> np.ndarray:
        """``(C, X, Y, Z)`` intensities after the run's intensity transforms."""
        return self.volume.image

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size (mm) along the reoriented axes."""
        return self.volume.spacing

    def native(self, array: np.ndarray) -> np.ndarray:
        """``array`` (reoriented grid) in the file's array order."""
        return self.volume.native(array)


def load_native_case(
    case_id: str, images: Sequence[str | Path], reference: str | Path, intensity: Sequence[Callable] = ()
) -> NativeCase:
    """Read a case's channels and reference, apply ``intensity`` and reorient both to RAS without interpolation.

    Args:
        intensity: the run's intensity transforms (:func:`medseg.inference.prepared.intensity_transforms`).

    Raises:
        ConfigError: the reference's grid differs from the image's.
    """
    image = load_case([str(p) for p in images])
    label = load_image(reference)
    if tuple(label.shape[1:]) != tuple(image.shape[1:]):
        raise ConfigError(
            f"{reference} has shape {tuple(label.shape[1:])} but its image {images[0]} has {tuple(image.shape[1:])}; "
            f"a reference must lie on its image's grid."
        )
    volume = prepare_volume(image, intensity)
    labels = volume.orientation.orient(np.rint(np.asarray(label[0])).astype(np.int64))
    return NativeCase(case_id, volume, labels)


def _objects(case: NativeCase, labels: Mapping[str, Any], settings: InteractiveSettings) -> list[dict[str, Any]]:
    """The case's objects to click on (classes or components), at most ``settings.max_objects``."""
    objects = interactive_objects(case.label, labels, settings.object_mode)
    return objects if settings.max_objects is None else objects[: settings.max_objects]


def _value(labels: Mapping[str, Any], name: str) -> int:
    values = foreground_classes(labels)[name]
    return int(values[0])


def evaluate_case(
    model: torch.nn.Module,
    case: NativeCase,
    labels: Mapping[str, int | Sequence[int]],
    settings: InteractiveSettings,
    slice_axis: int = 2,
    cache: EmbeddingCache | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Interactive metrics of every object of one case, and the case's label map (reoriented grid).

    Returns:
        ``(objects, label_map)``: per object ``{"class", "component", "n_voxels", "slice", "dice_at_k", "noc85",
        "noc90", "clicks", "box_dice", "propagation_dice"}`` (``slice``: the middle slice index on the reoriented
        grid), and the ``(X, Y, Z)`` label map of the propagated objects. A 3-D model goes to
        :func:`evaluate_case_3d` (``slice_axis`` and ``cache`` unused).

    Raises:
        ConfigError: a multi-channel image (the slice recipe is single-channel).
    """
    if int(getattr(model, "spatial_dims", 2)) == 3 and not is_sam2_model(model):
        return evaluate_case_3d(model, case, labels, settings, seed=seed)
    if case.image.shape[0] != 1:
        raise ConfigError(
            f"case {case.case_id} has {case.image.shape[0]} channels; the slice recipe of interactive evaluation reads "
            f"one channel."
        )
    cache = cache if cache is not None else EmbeddingCache(max_items=4096)
    volume = case.image[0]
    frames = None
    if is_sam2_model(model):  # SAM 2: the case's slices as frames, shared by every object (module docstring)
        frames = Sam2Frames(model, np.moveaxis(unit_volume(volume, _RECIPE), slice_axis, 0))
    spacing_2d = [s for axis, s in enumerate(case.spacing) if axis != slice_axis]
    prediction = np.zeros(case.label.shape, dtype=np.int64)
    objects = _objects(case, labels, settings)
    results = []
    for index, obj in enumerate(objects):
        mask = obj["mask"]
        box6 = middle_slice_box(mask, slice_axis)
        k = int(box6[slice_axis])
        image_2d, reference_2d = np.take(volume, k, axis=slice_axis), np.take(mask, k, axis=slice_axis)
        if frames is None:
            predict = slice_predictor(model, image_2d, cache, settings.multimask, recipe=_RECIPE)
        else:  # SAM 2 picks its best of three masks for a lone click itself
            predict = slice_predictor_sam2(frames, k)
        scores = evaluate_object(
            predict, reference_2d, spacing_2d, max_clicks=settings.max_clicks, dice_k=settings.dice_k,
            box_jitter_fraction=settings.box_jitter, seed=seed + index,
        )  # fmt: skip
        value = _value(labels, str(obj["class"]))
        if settings.propagation is not None:
            start = prompts_on_slice(Prompts(box=np.asarray(box6, dtype=np.float32)[None]), slice_axis, k)
            config = PropagationConfig(axis=slice_axis, **dict(settings.propagation))
            if frames is None:
                propagated = propagate(model, volume, k, prompts=start, config=config, recipe=_RECIPE, cache=cache).mask
            else:
                propagated = propagate_sam2(frames, k, start, config).mask
            scores["propagation_dice"] = propagation_dice(propagated, mask)
            prediction[propagated] = value
        else:
            box_mask = predict(Prompts(box=box_from_mask(reference_2d)[None].astype(np.float32)), None)
            np.moveaxis(prediction, slice_axis, 0)[k][box_mask] = value
        results.append(
            {"class": obj["class"], "component": obj["component"], "n_voxels": int(mask.sum()), "slice": k, **scores}
        )
    return results, prediction


def evaluate_case_3d(
    model: torch.nn.Module,
    case: NativeCase,
    labels: Mapping[str, int | Sequence[int]],
    settings: InteractiveSettings,
    target_spacing: Sequence[float] | None = None,
    overlap: float = 0.25,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Interactive metrics of every object of one case for a 3-D promptable model, clicks in 3-D (module docstring).

    Args:
        target_spacing: the training grid's voxel size (mm, RAS order); the model sees the volume zoomed to it.
            ``None``: the native grid.
        overlap: sliding-window overlap.

    Returns:
        ``(objects, label_map)``: per object ``{"class", "component", "n_voxels", "dice_at_k", "noc85", "noc90",
        "clicks", "box_dice", "propagation_dice": None}``, and the ``(X, Y, Z)`` label map of every object's mask
        from its tight 3-D box.
    """
    volume = minmax_per_image(torch.from_numpy(case.image).float()[None])[0]
    shape = model_grid(case.label.shape, case.spacing, target_spacing)
    predictor = volume_predictor(model, volume, shape, overlap)
    box_output: dict[str, torch.Tensor] = {}

    def predict(prompts: Prompts, prev_mask: torch.Tensor | None) -> torch.Tensor:
        output = predictor(prompts, prev_mask)
        if prompts.point_coords is None:  # the box-only prompt: kept for the case's label map
            box_output["mask"] = output
        return output

    prediction = np.zeros(case.label.shape, dtype=np.int64)
    objects = _objects(case, labels, settings)
    results = []
    for index, obj in enumerate(objects):
        mask = obj["mask"]
        scores = evaluate_object(
            predict, mask, case.spacing, max_clicks=settings.max_clicks, dice_k=settings.dice_k,
            box_jitter_fraction=settings.box_jitter, seed=seed + index,
        )  # fmt: skip
        prediction[(box_output.pop("mask") > 0.5).cpu().numpy()] = _value(labels, str(obj["class"]))
        results.append(
            {"class": obj["class"], "component": obj["component"], "n_voxels": int(mask.sum()), **scores,
             "propagation_dice": None}
        )  # fmt: skip
    return results, prediction
