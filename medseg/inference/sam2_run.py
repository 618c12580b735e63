"""Prompts file -> label map with SAM 2 / MedSAM2: every object carried through the volume by SAM 2's memory.

What ``medseg predict -m <SAM 2 or MedSAM2 .pt file | fine-tuned SAM 2 run> --prompts FILE`` runs
(:func:`predict_sam2_prompts`). Each object of the prompts file (:func:`medseg.inference.prompted.object_prompts`)
becomes one or more :class:`~medseg.inference.sam2_propagation.Sam2Tracker` whose conditioning slices are its
prompts (:func:`segment_objects_sam2`):

- boxes flat along the slice axis (2-D boxes) and points: one tracker; each flat box's slice is prompted with the box
  and the object's points on that slice, every other slice holding points with those points (clicks on several
  slices condition the memory together), and the object is propagated through the whole volume from the first box's
  slice (or, without a box, the slice with most positive points) in both directions. This is MedSAM2's use: a box on
  one key slice, the memory does the rest. (A 2-D model paints a flat box on its slice only; memory is what makes a
  key-slice box enough here.) Two flat boxes on one slice are two trackers;
- a 3-D box: its own tracker, prompted with the box's outline on its middle slice (MedSAM2's and MedSAM's 3-D
  inference) and the object's points on the box's slices, propagated within the box's slice range only.

An object's label covers the union of its trackers' masks; objects are painted in file order (a later one wins where
two overlap), as :func:`~medseg.inference.prompted.segment_objects` paints them. All objects share the volume's
frame features (:class:`~medseg.inference.sam2_frames.Sam2Frames`), so each slice is encoded once per volume (while
within the byte budget).

Intensities: an official model reads the raw volume through the slice recipe (``--window`` for CT, else MR
percentiles; :func:`~medseg.inference.sam2_frames.unit_volume`); a fine-tuned run reads the volume its own transforms
prepare on the RAS-permuted grid (:func:`medseg.inference.prepared.prepare_volume`), as a 2-D run's prompts do
(:mod:`medseg.inference.prompted_run`), and its label map returns to the file's array order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.errors import ConfigError, InputShapeError
from medseg.inference.loaded import LoadedModel
from medseg.inference.prepared import prepare_volume
from medseg.inference.prompted import PromptedResult, lead_point_slice, object_label, object_prompts, recipe_for
from medseg.inference.propagate import PropagationConfig
from medseg.inference.recipe import SliceRecipe
from medseg.inference.run_settings import run_prompt_settings
from medseg.inference.sam2_frames import Sam2Frames, unit_volume
from medseg.inference.sam2_propagation import Sam2Tracker
from medseg.prompts.contract import Prompts
from medseg.prompts.files import ObjectPrompts
from medseg.prompts.geometry import prompts_on_slice

__all__ = ["predict_sam2_prompts", "segment_objects_sam2", "tracker_plans"]


def _points_on(item: Prompts, axis: int, index: int) -> Prompts | None:
    """The item's clicks on slice ``index`` (its box left out), or ``None``."""
    if item.point_coords is None:
        return None
    points = Prompts(point_coords=item.point_coords, point_labels=item.point_labels)
    on_slice = prompts_on_slice(points, axis, index)
    return on_slice if on_slice is not None and on_slice.point_coords is not None else None


def _point_slices(item: Prompts, axis: int) -> list[int]:
    if item.point_coords is None:
        return []
    real = item.point_labels[0] >= 0
    return sorted({int(v) for v in item.point_coords[0][real][:, axis].tolist()})


def tracker_plans(prompts: Prompts, axis: int, depth: int) -> list[tuple[dict[int, Prompts], int, int]]:
    """An object's trackers (module docstring), each ``(2-D prompts by conditioning slice, lo, hi)``: the first key is
    the anchor the tracker propagates from, ``lo..hi`` the slices it may reach.

    Raises:
        PromptFileError: an object whose only prompts are negative points.
    """
    items = [prompts[b] for b in range(prompts.batch_size)]
    plans: list[tuple[dict[int, Prompts], int, int]] = []
    flat: dict[int, Prompts] = {}
    for item in items:
        if item.box is None:
            continue
        lo, hi = int(item.box[0, axis]), int(item.box[0, axis + 3])
        if lo == hi and lo not in flat:
            flat[lo] = prompts_on_slice(item, axis, lo)
            continue
        start = (lo + hi) // 2 if lo != hi else lo
        slices = {start: prompts_on_slice(item, axis, start)}
        for k in _point_slices(item, axis):
            if lo <= k <= hi and k != start:
                slices[k] = _points_on(item, axis, k)
        plans.append((slices, lo if lo != hi else 0, hi if lo != hi else depth - 1))
    if flat or all(item.box is None for item in items):
        item = items[0]
        slices = dict(flat)
        if not slices:  # points alone: the slice with most positive points leads
            lead = lead_point_slice(item, axis, object_label(prompts))
            slices[lead] = _points_on(item, axis, lead)
        for k in _point_slices(item, axis):
            slices.setdefault(k, _points_on(item, axis, k))
        plans.insert(0, (slices, 0, depth - 1))
    return plans


def _track(frames: Sam2Frames, config: PropagationConfig, slices: dict[int, Prompts], lo: int, hi: int) -> np.ndarray:
    tracker = Sam2Tracker(frames, config)
    with torch.inference_mode():
        for k, prompts in slices.items():  # the first one is the anchor
            tracker.prompt(k, prompts)
    tracker.propagate(next(iter(slices)), (1, -1), lo, hi)
    return tracker.volume_mask()


def segment_objects_sam2(
    model: torch.nn.Module,
    volume: np.ndarray | torch.Tensor,
    objects: Sequence[ObjectPrompts | Prompts],
    *,
    recipe: SliceRecipe | None = None,
    slice_axis: int = 2,
    propagation: PropagationConfig | None = None,
    batch_size: int | None = None,
) -> PromptedResult:
    """Segment every object of a prompts file with SAM 2's memory (module docstring).

    Args:
        model: a ``SAM2Base`` or a model holding one as ``sam2``.
        volume: ``(X, Y, Z)`` intensities (raw with a ``ct``/``mr`` recipe, a run's prepared ones with ``none``).
        objects: each object's prompts in voxel indices of ``volume``.
        recipe: intensity recipe (default MR percentiles).
        slice_axis: the array axis the slices are taken along.
        propagation: stop rules and threshold (``axis`` replaced by ``slice_axis``).
        batch_size: slices per encoder call (default: the propagation config's).

    Returns:
        :class:`~medseg.inference.prompted.PromptedResult`: the label map and the slices encoded.
    """
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim != 3:
        raise ConfigError(f"segment_objects_sam2 takes an (X, Y, Z) volume, got shape {array.shape}.")
    if slice_axis not in (0, 1, 2):
        raise ConfigError(f"--slice-axis must be 0, 1 or 2 (an array axis of the input), got {slice_axis}.")
    config = replace(propagation or PropagationConfig(), axis=slice_axis)
    slices = np.moveaxis(unit_volume(array, recipe or SliceRecipe("mr")), slice_axis, 0)
    frames = Sam2Frames(model, slices, batch_size or config.batch_size)
    prompts = [object_prompts(obj) for obj in objects]
    top = max((object_label(p) for p in prompts), default=0)
    labels = np.zeros(array.shape, dtype=np.uint8 if top <= 255 else np.uint16)
    view = np.moveaxis(labels, slice_axis, 0)
    for item in prompts:
        mask = np.zeros(slices.shape, dtype=bool)
        for plan, lo, hi in tracker_plans(item, slice_axis, frames.depth):
            mask |= _track(frames, config, plan, lo, hi)
        view[mask] = object_label(item)
    return PromptedResult(labels, frames.encoded, [])


def predict_sam2_prompts(
    loaded: LoadedModel,
    image: MetaTensor,
    objects: Sequence[ObjectPrompts | Prompts],
    *,
    slice_axis: int = 2,
    window: str | None = None,
    batch_size: int | None = None,
) -> PromptedResult:
    """``medseg predict --prompts`` with a SAM 2 model (module docstring); labels in the file's array order.

    Args:
        loaded: an official SAM 2 / MedSAM2 file (:func:`medseg.inference.sources.load_sam2_file`) or a fine-tuned
            run whose model holds ``sam2``.
        image: ``(1, X, Y, Z)`` as read.
        slice_axis: ``--slice-axis`` (an official model; a run keeps its training axis and says so).
        window: ``--window`` (an official model; a run keeps its own intensity transforms).
        batch_size: slices per encoder call.

    Raises:
        InputShapeError: a multi-channel image.
    """
    if image.shape[0] != 1:
        raise InputShapeError(
            f"SAM 2 reads one-channel volumes slice by slice; this image has {image.shape[0]} channels (a 4D file). "
            f"Give one 3D volume."
        )
    if not loaded.config.get("data"):  # an official file: the raw volume through the slice recipe, on the RAS grid
        raw = prepare_volume(image)  # permutation and flips only: a DICOM series and its NIfTI give the same frames
        oriented = [raw.orientation.prompts(object_prompts(obj)) for obj in objects]
        result = segment_objects_sam2(
            loaded.model, raw.image[0], oriented, recipe=recipe_for(window),
            slice_axis=int(raw.orientation.to_oriented[slice_axis, 0]), batch_size=batch_size,
        )  # fmt: skip
        return replace(result, labels=raw.native(result.labels))
    settings = run_prompt_settings(loaded)
    volume = prepare_volume(image, settings.intensity)
    notes = []
    file_axis = volume.orientation.file_axis(settings.slice_axis)
    if slice_axis != file_axis:
        notes.append(
            f"--slice-axis {slice_axis} not used: this run slices along its training axis, array axis {file_axis} of "
            f"this file (RAS axis {settings.slice_axis})"
        )
    oriented = [volume.orientation.prompts(object_prompts(obj)) for obj in objects]
    result = segment_objects_sam2(
        loaded.model, volume.image[0], oriented, recipe=SliceRecipe("none"), slice_axis=settings.slice_axis,
        propagation=settings.propagation, batch_size=batch_size,
    )  # fmt: skip
    return PromptedResult(volume.native(result.labels), result.encoded, notes)
