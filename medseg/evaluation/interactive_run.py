"""Interactive evaluation of a 2-D promptable model on one test case, on the case's native voxel grid.

The simulated user (:mod:`medseg.evaluation.interactive`) clicks on the *native* reference, so every Dice is measured
on the grid of the files, never on the resampled training grid. Per case:

1. the image and reference are read as stored, the run's deterministic *intensity* transforms are applied (CT window,
   MR percentiles: the transforms that :class:`monai.transforms.Invertd` would not invert; resampling and cropping are
   left out), and both are reoriented to RAS by axis permutation and flips only (nibabel's closest canonical
   orientation, no interpolation), so that slices along ``slice_axis`` are the planes the model was trained on;
2. per object (a present class, or one connected component of it), on the object's middle slice along
   ``slice_axis`` (the slice :func:`~medseg.evaluation.interactive.middle_slice_box` takes): Dice after 1..k clicks,
   NoC@85/90 and the Dice of the tight box, with the LiteMedSAM slice recipe of :mod:`medseg.inference.recipe`
   (resize longest side, min-max to [0, 1], pad), the model's own previous logits as mask prompt between clicks,
   and SAM's multi-mask choice for a lone click (:func:`~medseg.tasks.prompt_sampling.decode_best`);
3. the object is propagated through the volume from one box on that slice (:func:`medseg.inference.propagate`), and
   its Dice scored; the propagated objects, painted into one label map and brought back to the native orientation,
   are the case's prediction (``predictions/CASE.nii.gz``) that the usual per-class metrics score.

Every slice is encoded once per case (:class:`~medseg.inference.cache.EmbeddingCache`), whatever the number of clicks
and objects.

A 3-D (volumetric) model is evaluated in 3-D instead (:func:`evaluate_case_3d`): the simulated user clicks on the
whole native volume (RAS-permuted, as above), each round runs :func:`medseg.inference.volumetric.predict_prompted`
(sliding windows of the model's ``roi_size``, prompts mapped into each window) with every click so far and the
previous round's logits as mask prompt, and the box Dice comes from the object's tight 3-D box. The volume is min-max
scaled to [0, 1] per channel, as training scales each patch, and, when the run resamples to a target spacing (its
``Spacingd``), zoomed to that spacing for the model so windows see the training scale; clicks and boxes are mapped
to the zoomed grid and the logits zoomed back, so every Dice is still on the native voxels. Propagation Dice is a
2-D-model metric (one box carried slice by slice) and is ``null`` for 3-D models; the case's label map holds each
object's mask from its box prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import InvertibleTransform
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from medseg.data.io import LoadCased, load_case, load_image
from medseg.errors import ConfigError
from medseg.evaluation.interactive import (
    evaluate_object,
    interactive_objects,
    middle_slice_box,
    propagation_dice,
)
from medseg.evaluation.metrics import foreground_classes, spacing_from_affine
from medseg.inference.cache import EmbeddingCache
from medseg.inference.propagate import PropagationConfig, propagate, slice_box
from medseg.inference.recipe import (
    SliceRecipe,
    embed_slices,
    postprocess_logits,
    preprocess_slice,
    prompt_lists,
    scaled_prompts,
    slice_geometry,
    to_uint8,
)
from medseg.inference.volumetric import predict_prompted
from medseg.prompts.contract import Prompts
from medseg.prompts.simulate import box_from_mask
from medseg.tasks.prompt_sampling import decode_best, minmax_per_image

__all__ = [
    "InteractiveSettings",
    "NativeCase",
    "evaluate_case",
    "evaluate_case_3d",
    "intensity_transforms",
    "load_native_case",
    "volume_predictor",
]

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
    """

    max_clicks: int = 20
    dice_k: int = 10
    max_objects: int | None = None
    max_cases: int | None = None
    object_mode: str = "class"
    box_jitter: float = 0.0
    multimask: bool = True
    propagation: Mapping[str, Any] | None = field(default_factory=dict)

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
        return settings


@dataclass
class NativeCase:
    """One test case on its native voxels, reoriented to RAS (see the module docstring).

    Attributes:
        image: ``(C, X, Y, Z)`` intensities after the run's intensity transforms.
        label: ``(X, Y, Z)`` integer reference.
        spacing: voxel size (mm) along the reoriented axes.
        to_native: nibabel orientation transform that brings a reoriented array back to the file's array order.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...]
    to_native: np.ndarray

    def native(self, array: np.ndarray) -> np.ndarray:
        """``array`` (reoriented grid) in the file's array order."""
        return np.ascontiguousarray(apply_orientation(array, self.to_native))


def intensity_transforms(transform: Any) -> list[Callable]:
    """The deterministic transforms that change intensities only (not inverted by ``Invertd``, not the loader)."""
    return [t for t in getattr(transform, "transforms", ()) if not isinstance(t, InvertibleTransform | LoadCased)]


def load_native_case(
    case_id: str, images: Sequence[str | Path], reference: str | Path, intensity: Sequence[Callable] = ()
) -> NativeCase:
    """Read a case's channels and reference, apply ``intensity`` and reorient both to RAS without interpolation.

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
    data: dict[str, Any] = {"image": image}
    for transform in intensity:
        data = transform(data)
    affine = np.asarray(image.affine, dtype=np.float64)
    ornt = io_orientation(affine)
    to_ras = ornt_transform(ornt, axcodes2ornt("RAS"))
    values = np.asarray(torch.as_tensor(data["image"]).float().numpy())
    oriented = np.ascontiguousarray(np.stack([apply_orientation(channel, to_ras) for channel in values]))
    labels = np.ascontiguousarray(apply_orientation(np.rint(np.asarray(label[0])).astype(np.int64), to_ras))
    native_spacing = spacing_from_affine(affine)
    spacing = [0.0] * 3
    for axis, (new_axis, _) in enumerate(to_ras):
        spacing[int(new_axis)] = float(native_spacing[axis])
    return NativeCase(case_id, oriented, labels, tuple(spacing), ornt_transform(axcodes2ornt("RAS"), ornt))


def slice_predictor(model: torch.nn.Module, slice_2d: np.ndarray, cache: EmbeddingCache, multimask: bool = True):
    """``predict_fn(prompts, prev_mask) -> (H, W) bool`` on one slice, for the interactive loop.

    Like :func:`medseg.inference.recipe.slice_predictor`, with the multi-mask rule the model was trained with: SAM's
    three masks for a lone click (best predicted IoU), the single mask once there are more clicks or a box.
    """
    size = model.image_size
    geometry = slice_geometry(slice_2d.shape, size)
    embedding = cache.get_or_compute(
        slice_2d, model, _RECIPE.signature(size, None),
        lambda: embed_slices(model, preprocess_slice(to_uint8(slice_2d, _RECIPE), size)[0]),
    )  # fmt: skip
    state: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def predict(prompts: Prompts, prev_mask: torch.Tensor | None) -> np.ndarray:
        box, points, labels = prompt_lists(prompts)
        previous = state.get("logits") if prev_mask is not None else None
        scaled = scaled_prompts(geometry, box, points, labels, previous).to(embedding.device)
        state["logits"] = decode_best(model, embedding, scaled, multimask)
        return (torch.sigmoid(postprocess_logits(state["logits"], geometry))[0, 0] > 0.5).cpu().numpy()

    return predict


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
    if int(getattr(model, "spatial_dims", 2)) == 3:
        return evaluate_case_3d(model, case, labels, settings, seed=seed)
    if case.image.shape[0] != 1:
        raise ConfigError(
            f"case {case.case_id} has {case.image.shape[0]} channels; the slice recipe of interactive evaluation reads "
            f"one channel."
        )
    cache = cache if cache is not None else EmbeddingCache(max_items=4096)
    volume = case.image[0]
    spacing_2d = [s for axis, s in enumerate(case.spacing) if axis != slice_axis]
    prediction = np.zeros(case.label.shape, dtype=np.int64)
    objects = _objects(case, labels, settings)
    results = []
    for index, obj in enumerate(objects):
        mask = obj["mask"]
        box6 = middle_slice_box(mask, slice_axis)
        k = int(box6[slice_axis])
        image_2d, reference_2d = np.take(volume, k, axis=slice_axis), np.take(mask, k, axis=slice_axis)
        predict = slice_predictor(model, image_2d, cache, settings.multimask)
        scores = evaluate_object(
            predict, reference_2d, spacing_2d, max_clicks=settings.max_clicks, dice_k=settings.dice_k,
            box_jitter_fraction=settings.box_jitter, seed=seed + index,
        )  # fmt: skip
        value = _value(labels, str(obj["class"]))
        if settings.propagation is not None:
            _, box_2d = slice_box(box6, slice_axis)
            config = PropagationConfig(axis=slice_axis, **dict(settings.propagation))
            propagated = propagate(model, volume, k, box=box_2d, config=config, recipe=_RECIPE, cache=cache).mask
            scores["propagation_dice"] = propagation_dice(propagated, mask)
            prediction[propagated] = value
        else:
            box_mask = predict(Prompts(box=box_from_mask(reference_2d)[None].astype(np.float32)), None)
            np.moveaxis(prediction, slice_axis, 0)[k][box_mask] = value
        results.append(
            {"class": obj["class"], "component": obj["component"], "n_voxels": int(mask.sum()), "slice": k, **scores}
        )
    return results, prediction


def _zoom_points(coords: torch.Tensor, factor: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Voxel centres of the native grid on a grid ``factor`` times as fine (align_corners=False), clipped inside."""
    return torch.minimum(((coords + 0.5) * factor - 0.5).clamp_min(0), shape - 1)


class _WindowEncodings(torch.nn.Module):
    """A volumetric model whose ``encode`` remembers each window's embedding (keyed by the window's voxels).

    The windows of one volume are the same at every click; only the prompts change, so each is encoded once per
    volume, as the 2-D evaluation encodes each slice once (:class:`~medseg.inference.cache.EmbeddingCache`).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.roi_size = model, model.roi_size
        self._embeddings: dict[str, Any] = {}
        self.train(model.training)  # predict_prompted restores this mode on the model when it is done

    def encode(self, window: torch.Tensor) -> Any:
        key = hashlib.sha1(window.detach().float().cpu().numpy().tobytes()).hexdigest()
        if key not in self._embeddings:
            self._embeddings[key] = self.model.encode(window)
        return self._embeddings[key]

    def decode(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.decode(*args, **kwargs)


def volume_predictor(model: torch.nn.Module, volume: torch.Tensor, model_shape=None, overlap: float = 0.25):
    """``predict_fn(prompts, prev_mask) -> (X, Y, Z)`` probabilities of a 3-D model over a whole volume.

    Each call runs :func:`~medseg.inference.volumetric.predict_prompted` with the prompts (native voxels of
    ``volume``) and, when ``prev_mask`` is given, the previous call's logits (on the model grid) as mask prompt, as
    the 2-D predictors keep their own logits between clicks. Each window is encoded once, whatever the clicks.

    Args:
        model: a volumetric promptable model (``roi_size``, ``encode``, ``decode``).
        volume: ``(C, X, Y, Z)`` intensities in the model's input range.
        model_shape: ``(X', Y', Z')`` grid the model sees (the volume zoomed trilinearly to the training spacing);
            ``None``: the volume's own grid. Points and boxes are mapped onto it, logits zoomed back.
        overlap: sliding-window overlap (fraction of the roi).
    """
    native = tuple(int(s) for s in volume.shape[1:])
    target = native if model_shape is None else tuple(int(s) for s in model_shape)
    zoomed = target != native
    image = volume.float()
    if zoomed:
        image = torch.nn.functional.interpolate(image[None], size=target, mode="trilinear", align_corners=False)[0]
    factor = torch.tensor(target, dtype=torch.float32) / torch.tensor(native, dtype=torch.float32)
    size = torch.tensor(target, dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}
    cached = _WindowEncodings(model)

    @torch.no_grad()
    def predict(prompts: Prompts, prev_mask: torch.Tensor | None) -> torch.Tensor:
        previous = state.get("logits") if prev_mask is not None else None
        prompts = prompts.with_prev_mask(None if previous is None else previous[:, None])
        if zoomed and prompts.point_coords is not None:
            coords = _zoom_points(prompts.point_coords.float(), factor, size)
            prompts = replace(prompts, point_coords=coords)
        if zoomed and prompts.box is not None:
            box = prompts.box.float()
            lo = torch.floor(box[:, :3] * factor)
            hi = torch.minimum(torch.ceil((box[:, 3:] + 1) * factor) - 1, size - 1)
            prompts = replace(prompts, box=torch.cat([lo, torch.maximum(hi, lo)], dim=1))
        logits = predict_prompted(cached, image, prompts, overlap=overlap)
        state["logits"] = logits
        if zoomed:
            logits = torch.nn.functional.interpolate(logits[:, None], size=native, mode="trilinear")[:, 0]
        return torch.sigmoid(logits[0])

    return predict


def model_grid(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None) -> tuple[int, ...]:
    """Voxels per axis of a volume of ``shape`` at ``spacing`` (mm) resampled to ``target`` mm (None: unchanged)."""
    if target is None:
        return tuple(int(s) for s in shape)
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target))


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
