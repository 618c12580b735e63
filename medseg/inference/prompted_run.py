"""Prompts file -> label map with a promptable run of ``medseg train``, prepared exactly as its evaluation does.

``medseg evaluate`` scores a 2-D promptable run (:func:`medseg.evaluate.evaluate_promptable_model`,
:mod:`medseg.evaluation.interactive_run`) on each test volume as stored, not on the resampled training grid:

1. the run's deterministic *intensity* transforms (``intensity_transforms``: CT window, MR percentiles; resampling
   and cropping left out) are applied to the image as read;
2. the volume is reoriented to RAS by axis permutation and flips only (nibabel's closest canonical orientation, no
   interpolation), so that slices along the run's ``task.inference.slice_axis`` are the planes it was trained on;
3. every slice is min-max scaled to [0, 1] after the longest side is resized to the model size (the slice recipe of
   :mod:`medseg.inference.recipe` with ``intensity="none"``, as the task's ``minmax_per_image`` does in training);
4. objects are propagated along the slice axis (:mod:`medseg.inference.propagate`) with the run's
   ``task.evaluation.propagation`` settings, and the label map is brought back to the file's array order.

:func:`predict_run_prompts` replays exactly this on one image of ``medseg predict``. The prompts (voxel indices of
the file, :func:`medseg.prompts.files.load_prompts`; world prompts are converted there) are mapped into the RAS grid
with the same permutation and flips, and each object is segmented by
:func:`medseg.inference.prompted.segment_objects` (a box with ``k0 == k1`` on one slice; a 3-D box or points by
propagation), so an object prompted by one 2-D box gets the very mask the evaluation's ``predict_fn`` gives.

The slice axis is the run's own (an axis of the RAS grid, where the model was trained); ``--slice-axis`` cannot
change it. 3-D volumetric promptable runs (``spatial_dims == 3``) go to
:func:`medseg.inference.prompted_run_3d.predict_run_prompts_3d`, which replays their 3-D evaluation (min-max, zoom to
the training spacing, sliding windows with 3-D boxes and points) on the same RAS grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from omegaconf import OmegaConf

from medseg.errors import ConfigError, InputShapeError
from medseg.inference.cache import EmbeddingCache
from medseg.inference.loaded import LoadedModel
from medseg.inference.prompted import PromptedResult, segment_objects
from medseg.inference.propagate import PropagationConfig
from medseg.inference.recipe import SliceRecipe
from medseg.prompts.files import ObjectPrompts

__all__ = [
    "OrientedVolume",
    "RunPromptSettings",
    "objects_to_oriented",
    "orient_for_run",
    "predict_run_prompts",
    "run_prompt_settings",
]

RUN_RECIPE = SliceRecipe(intensity="none")  # the run's own transforms set intensities; slices are min-maxed


@dataclass
class OrientedVolume:
    """One image after the run's intensity transforms, reoriented to RAS without interpolation.

    Attributes:
        image: ``(C, X, Y, Z)`` float32 intensities on the RAS-permuted grid.
        to_oriented: nibabel orientation transform, file array order -> RAS grid (``(3, 2)``: new axis, flip).
        to_native: the inverse transform, RAS grid -> file array order.
        native_shape: ``(X, Y, Z)`` of the file.
    """

    image: np.ndarray
    to_oriented: np.ndarray
    to_native: np.ndarray
    native_shape: tuple[int, int, int]

    def native(self, array: np.ndarray) -> np.ndarray:
        """``array`` on the RAS grid, in the file's array order."""
        return np.ascontiguousarray(apply_orientation(array, self.to_native))

    def axis_in_file(self, axis: int) -> int:
        """The file's array axis that becomes RAS-grid axis ``axis``."""
        return int(np.flatnonzero(self.to_oriented[:, 0] == axis)[0])


@dataclass(frozen=True)
class RunPromptSettings:
    """What a promptable run's config says about prompting it (``task.inference``, ``task.evaluation``).

    Attributes:
        slice_axis: RAS-grid axis the 2-D model slices along (``task.inference.slice_axis``, default 2).
        propagation: carry and stop rules of ``task.evaluation.propagation`` (defaults when absent or ``null``).
    """

    slice_axis: int
    propagation: PropagationConfig


def _section(config: Any, *keys: str) -> dict[str, Any]:
    node = config
    for key in keys:
        node = node.get(key) if node is not None and hasattr(node, "get") else None
    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return dict(node) if isinstance(node, Mapping) else {}


def run_prompt_settings(loaded: LoadedModel) -> RunPromptSettings:
    """Slice axis and propagation rules of a promptable run, as its interactive evaluation uses them.

    Raises:
        ConfigError: a slice axis outside 0-2, or unknown propagation keys (named in the message).
    """
    axis = _section(loaded.config, "task", "inference").get("slice_axis")
    axis = 2 if axis is None else int(axis)
    if axis not in (0, 1, 2):
        raise ConfigError(f"{loaded.source}: task.inference.slice_axis must be 0, 1 or 2, got {axis}.")
    rules = _section(loaded.config, "task", "evaluation").get("propagation") or {}
    rules = {k: v for k, v in dict(rules).items() if k != "axis"}
    try:
        propagation = PropagationConfig(axis=axis, **rules)
    except TypeError as err:
        raise ConfigError(
            f"{loaded.source}: task.evaluation.propagation {rules} does not fit PropagationConfig ({err}); remove the "
            f"unknown keys."
        ) from None
    return RunPromptSettings(axis, propagation)


def orient_for_run(image: MetaTensor, intensity: Sequence[Any] = ()) -> OrientedVolume:
    """Apply ``intensity`` to ``image`` and reorient it to RAS by permutation and flips, as evaluation does.

    Args:
        image: ``(C, X, Y, Z)`` MetaTensor as read (:func:`medseg.inference.cases.read_case`), affine in RAS+ mm.
        intensity: the run's intensity transforms (:func:`medseg.evaluation.interactive_run.intensity_transforms`).
    """
    data: dict[str, Any] = {"image": image}
    for transform in intensity:
        data = transform(data)
    ornt = io_orientation(np.asarray(image.affine, dtype=np.float64))
    to_ras = ornt_transform(ornt, axcodes2ornt("RAS"))
    values = np.asarray(torch.as_tensor(data["image"]).float().numpy())
    oriented = np.ascontiguousarray(np.stack([apply_orientation(channel, to_ras) for channel in values]))
    shape = tuple(int(s) for s in image.shape[1:])
    return OrientedVolume(oriented, to_ras, ornt_transform(axcodes2ornt("RAS"), ornt), shape)  # type: ignore[arg-type]


def _map_indices(indices: np.ndarray, volume: OrientedVolume) -> np.ndarray:
    """``(N, 3)`` voxel indices of the file -> indices of the RAS grid (same permutation and flips as the data)."""
    out = np.empty_like(indices)
    for axis, (new_axis, flip) in enumerate(volume.to_oriented):
        values = indices[:, axis]
        out[:, int(new_axis)] = volume.native_shape[axis] - 1 - values if flip < 0 else values
    return out


def objects_to_oriented(objects: Sequence[ObjectPrompts], volume: OrientedVolume) -> list[ObjectPrompts]:
    """Prompts in voxel indices of the file -> the same prompts on the RAS grid of :func:`orient_for_run`.

    A box's corners are mapped and re-sorted per axis (a flipped axis swaps low and high), so a box flat along one
    file axis stays flat along the corresponding RAS axis.
    """
    mapped = []
    for obj in objects:
        boxes = np.asarray(obj.boxes, dtype=np.int64).reshape(-1, 6)
        if len(boxes):
            lo, hi = _map_indices(boxes[:, :3], volume), _map_indices(boxes[:, 3:], volume)
            boxes = np.concatenate([np.minimum(lo, hi), np.maximum(lo, hi)], axis=1)
        points = np.asarray(obj.points, dtype=np.int64).reshape(-1, 3)
        points = _map_indices(points, volume) if len(points) else points
        mapped.append(ObjectPrompts(int(obj.label), boxes, points, np.asarray(obj.point_labels, dtype=np.int64)))
    return mapped


def predict_run_prompts(
    loaded: LoadedModel,
    image: MetaTensor,
    objects: Sequence[ObjectPrompts],
    requested_axis: int | None = None,
    cache: EmbeddingCache | None = None,
    progress: bool = False,
) -> PromptedResult:
    """Segment the objects of a prompts file with a trained promptable run (module docstring).

    A 3-D run goes to :func:`medseg.inference.prompted_run_3d.predict_run_prompts_3d` (``requested_axis``, ``cache``
    and ``progress`` unused: it slides windows over the whole volume).

    Args:
        loaded: a promptable run (:func:`medseg.inference.sources.load_run`) or release with ``data.preprocess``.
        image: ``(1, X, Y, Z)`` MetaTensor as read, affine in RAS+ mm.
        objects: prompts in voxel indices of ``image`` (file array order).
        requested_axis: the ``--slice-axis`` asked for (file array axis); a note says so when the run's axis differs.
        cache: embedding cache shared across objects and cases.
        progress: progress bar over the slices of each propagation.

    Returns:
        :class:`~medseg.inference.prompted.PromptedResult` whose ``labels`` are in the file's array order and shape.

    Raises:
        ConfigError: a run config without preprocessing, or a model neither 2-D nor 3-D.
        InputShapeError: a multi-channel image for a 2-D run (the slice recipe reads one channel).
    """
    from medseg.evaluation.interactive_run import intensity_transforms
    from medseg.inference.dense import preprocessing_of

    dims = int(getattr(loaded.model, "spatial_dims", 2))
    if dims == 3:
        from medseg.inference.prompted_run_3d import predict_run_prompts_3d

        return predict_run_prompts_3d(loaded, image, objects)
    if dims != 2:
        raise ConfigError(
            f"{loaded.source}: model.spatial_dims is {dims}; a promptable run is 2-D (model=promptable_2d) or 3-D "
            f"(model=promptable_3d). Check the run's config."
        )
    if image.shape[0] != 1:
        raise InputShapeError(
            f"{loaded.source} reads one-channel volumes slice by slice; this image has {image.shape[0]} channels (a 4D "
            f"file). Give one 3D volume."
        )
    settings = run_prompt_settings(loaded)
    volume = orient_for_run(image, intensity_transforms(preprocessing_of(loaded)))
    notes = []
    file_axis = volume.axis_in_file(settings.slice_axis)
    if requested_axis is not None and requested_axis != file_axis:
        notes.append(
            f"--slice-axis {requested_axis} not used: this run slices along its training axis, array axis "
            f"{file_axis} of this file (RAS axis {settings.slice_axis})"
        )
    result = segment_objects(
        loaded.model, volume.image[0], objects_to_oriented(objects, volume), recipe=RUN_RECIPE,
        slice_axis=settings.slice_axis, cache=cache, propagation=settings.propagation, progress=progress,
    )  # fmt: skip
    return PromptedResult(volume.native(result.labels), result.encoded, notes + result.ignored)
