"""Prompts file -> label map with a 2-D promptable model: one slice, or propagation through the volume.

This is what ``medseg predict -m litemedsam --prompts FILE`` runs on a raw volume, with the official LiteMedSAM recipe
of :mod:`medseg.inference.recipe`, and what a trained 2-D run runs on its prepared volume
(:mod:`medseg.inference.prompted_run`). The model slices the volume along ``slice_axis`` (the last array axis unless
said otherwise). Each object travels as one :class:`~medseg.prompts.contract.Prompts` (:func:`object_prompts`: an item
per box with all the object's points, or one item for points alone; its label in ``class_vector``), in voxel indices
of the volume, and every item becomes a mask from its 2-D prompts on one slice
(:func:`medseg.prompts.geometry.prompts_on_slice`):

- a box flat along the slice axis (``k0 == k1`` for the last axis) is a 2-D box on that one slice, together with
  the object's points that lie on that slice;
- a 3-D box is segmented as MedSAM's 3-D inference does it: its middle slice gets the box's 2-D outline (and the
  object's points on that slice), and the mask is propagated slice by slice (:func:`~medseg.inference.propagate`)
  inside the box's slice range only;
- points without a box start a propagation through the whole volume from the slice that holds most positive points
  (prompted by all points on it). Points on other slices do not take part; the function reports them (``ignored``).

A file is segmented on its RAS-oriented grid (:func:`segment_image_objects`, what ``medseg predict`` runs): the DICOM
series and the NIfTI of one scan often store its voxels in different array orders (LPS against RAS, slices top-down
against bottom-up), and LiteMedSAM is not invariant to flipped or transposed slices, so slicing each file as stored
gave the two files different masks. Reoriented by permutation and flips (no interpolation, as a trained run's volume
is, :mod:`medseg.inference.prepared`), both files hand the model the very same slices.

An object's label covers the union of its prompts' masks. Objects are painted in file order, so where two objects
overlap the later one wins (as MedSAM's ``CVPR24_LiteMedSAM_infer.py`` does).

Intensities are mapped to 0-255 once for the whole volume (CT window, or MR percentiles of the voxels > 0 over the
whole volume, as MedSAM computes them), then every slice goes through the rest of the recipe. The embedding cache is
keyed by that 0-255 slice, the weights and the recipe, so a second object, box or click on a slice already seen never
runs the encoder again; with a folder, neither does a second run on the same image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.data.transforms import CT_WINDOWS, resolve_window
from medseg.errors import ConfigError
from medseg.inference.cache import EmbeddingCache, embedding_key, weights_hash
from medseg.inference.prepared import prepare_volume
from medseg.inference.propagate import PropagationConfig, propagate
from medseg.inference.recipe import SliceRecipe, embed_into_cache, predict_slice, to_uint8
from medseg.prompts.contract import Prompts
from medseg.prompts.files import ObjectPrompts, PromptFileError
from medseg.prompts.geometry import prompts_on_slice

__all__ = [
    "PromptedResult",
    "lead_point_slice",
    "object_label",
    "object_prompts",
    "recipe_for",
    "segment_image_objects",
    "segment_objects",
    "window_from_text",
]


def window_from_text(text: str) -> tuple[float, float]:
    """``(level, width)`` in HU from ``--window``: ``LEVEL:WIDTH`` (e.g. ``40:400``) or a preset (``abdomen``...).

    Raises:
        ConfigError: neither a preset nor two numbers, or a width that is not positive.
    """
    try:
        level, width = resolve_window(text.strip())
    except ValueError:
        raise ConfigError(
            f"--window {text!r} is not LEVEL:WIDTH in HU (e.g. 40:400) nor a preset ({', '.join(CT_WINDOWS)})."
        ) from None
    if not (np.isfinite(level) and np.isfinite(width)) or width <= 0:
        raise ConfigError(f"--window {text!r}: the width must be a positive number of HU, e.g. 40:400.")
    return level, width


def recipe_for(window: str | Sequence[float] | None) -> SliceRecipe:
    """The LiteMedSAM intensity recipe: a CT window (``LEVEL:WIDTH``, preset or pair, HU), else MR percentiles."""
    if window is None:
        return SliceRecipe("mr")
    level, width = window_from_text(window) if isinstance(window, str) else (float(window[0]), float(window[1]))
    return SliceRecipe("ct", window=(level, width))


@dataclass
class PromptedResult:
    """Attributes: ``labels`` ``(X, Y, Z)`` uint8/uint16 label map; ``encoded`` slices run through the encoder;
    ``ignored`` human-readable notes on prompts that took no part (points off the starting slice)."""

    labels: np.ndarray
    encoded: int = 0
    ignored: list[str] = field(default_factory=list)


def object_prompts(obj: ObjectPrompts | Prompts) -> Prompts:
    """One object's prompts as the path carries them: a :class:`Prompts` batch with one item per box (each with all
    the object's points) or one item for points alone, the object's label in ``class_vector``."""
    if isinstance(obj, ObjectPrompts):
        return obj.to_prompts()
    if obj.class_vector is None or obj.spatial_dims != 3:
        raise ConfigError("an object's Prompts need 3-D points or boxes and its label value in class_vector.")
    return obj


def object_label(prompts: Prompts) -> int:
    """The label value an object's prompts (:func:`object_prompts`) are painted with."""
    return int(prompts.class_vector[0, 0])


def _is_flat(prompts: Prompts, axis: int) -> bool:
    return prompts.box is not None and float(prompts.box[0, axis]) == float(prompts.box[0, axis + 3])


class _FlatSlices:
    """Embeds the slices that flat (2-D) boxes sit on ``batch_size`` at a time, ahead of their decoding.

    Batching is a GPU lever (on a CPU one slice at a time is as fast); with ``batch_size`` 1 nothing is done ahead.
    Slices are embedded in the order the boxes come, a batch at a time, so the cache (LRU, 256 slices by default)
    never has to hold more than one batch beyond what is being decoded.
    """

    def __init__(
        self, model: torch.nn.Module, volume: np.ndarray, objects: Sequence[Prompts], axis: int,
        cache: EmbeddingCache, batch_size: int,
    ) -> None:  # fmt: skip
        self.model, self.volume, self.axis, self.cache, self.batch_size = model, volume, axis, cache, batch_size
        items = [obj[b] for obj in objects for b in range(obj.batch_size)]
        order = [int(item.box[0, axis]) for item in items if _is_flat(item, axis)]
        self.order = list(dict.fromkeys(order))  # unique, in the order the boxes are decoded
        self.position = {k: i for i, k in enumerate(self.order)}
        self.done: set[int] = set()
        self.signature = SliceRecipe("none").signature(model.image_size, None)

    def ensure(self, k: int) -> None:
        """Embed slice ``k`` and the next ``batch_size - 1`` slices to come, unless cached or embedded already."""
        if self.batch_size < 2 or k in self.done or k not in self.position:
            return
        chunk = [j for j in self.order[self.position[k] :] if j not in self.done][: self.batch_size]
        self.done.update(chunk)
        weights = weights_hash(self.model)
        keys = {j: embedding_key(np.take(self.volume, j, axis=self.axis), weights, self.signature) for j in chunk}
        missing = [j for j in chunk if self.cache.get(keys[j]) is None]
        if missing:
            planes = np.stack([np.take(self.volume, j, axis=self.axis) for j in missing])
            embed_into_cache(self.model, planes, [keys[j] for j in missing], self.cache)


class _Encoder:
    """Counts the slices a model encodes, by wrapping its ``encode`` for the duration of a call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.count = model, 0

    def __enter__(self) -> _Encoder:
        self._previous = vars(self.model).get("encode")  # an instance-level wrapper already there (tests, tools)
        original = self.model.encode

        def encode(images: torch.Tensor) -> torch.Tensor:
            self.count += int(images.shape[0])
            return original(images)

        self.model.encode = encode
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is None:
            del self.model.encode
        else:
            self.model.encode = self._previous


def lead_point_slice(item: Prompts, axis: int, label: int) -> int:
    """The slice (along ``axis``) holding most of an object's positive points: where a points-only object starts.

    Raises:
        PromptFileError: the object has negative points only.
    """
    coords, labels = item.point_coords[0], item.point_labels[0]
    positive = coords[labels == 1]
    if not len(positive):
        raise PromptFileError(
            f"object with label {label} has only negative points (point_labels 0) and no box: nothing says "
            f"where it is. Add a positive point (label 1) or a box."
        )
    slices, counts = np.unique(positive[:, axis].numpy(), return_counts=True)
    return int(slices[counts.argmax()])


def _object_mask(
    model: torch.nn.Module,
    volume: np.ndarray,
    prompts: Prompts,
    axis: int,
    cache: EmbeddingCache,
    config: PropagationConfig,
    progress: bool,
    notes: list[str],
    ahead: _FlatSlices,
) -> np.ndarray:
    plain = SliceRecipe("none")  # intensities are 0-255 already (whole-volume window or percentiles)
    mask = np.zeros(volume.shape, dtype=bool)
    label = object_label(prompts)
    for item in (prompts[b] for b in range(prompts.batch_size)):
        if item.box is None:  # points alone: propagation from the slice holding most positive points
            coords, labels = item.point_coords[0], item.point_labels[0]
            start = lead_point_slice(item, axis, label)
            elsewhere = int(((coords[:, axis] != start) & (labels >= 0)).sum())
            if elsewhere:
                notes.append(
                    f"object {label}: {elsewhere} point(s) off slice {start} (axis {axis}) were not used; propagation "
                    f"starts from the slice with most positive points"
                )
            result = propagate(
                model, volume, start, prompts=prompts_on_slice(item, axis, start), recipe=plain, config=config,
                cache=cache, progress=progress,
            )  # fmt: skip
            mask |= result.mask
            continue
        lo, hi = int(item.box[0, axis]), int(item.box[0, axis + 3])
        index: list = [slice(None)] * 3
        if lo == hi:
            plane = np.take(volume, lo, axis=axis)
            index[axis] = lo
            ahead.ensure(lo)
            on_slice = prompts_on_slice(item, axis, lo)
            mask[tuple(index)] |= predict_slice(model, plane, recipe=plain, cache=cache, prompts=on_slice).mask
            continue
        middle = (lo + hi) // 2  # MedSAM's 3-D inference: the box's outline on its middle slice, propagated inside it
        inside = np.take(volume, np.arange(lo, hi + 1), axis=axis)  # propagation never leaves the box's slices
        result = propagate(
            model, inside, middle - lo, prompts=prompts_on_slice(item, axis, middle), recipe=plain, config=config,
            cache=cache, progress=progress,
        )  # fmt: skip
        index[axis] = slice(lo, hi + 1)
        mask[tuple(index)] |= result.mask
    return mask


@torch.inference_mode()
def segment_objects(
    model: torch.nn.Module,
    volume: np.ndarray | torch.Tensor,
    objects: Sequence[ObjectPrompts | Prompts],
    *,
    recipe: SliceRecipe | None = None,
    slice_axis: int = 2,
    cache: EmbeddingCache | None = None,
    propagation: PropagationConfig | None = None,
    progress: bool = False,
    batch_size: int | None = None,
) -> PromptedResult:
    """Segment every object of a prompts file on a raw volume with a 2-D promptable model (module docstring).

    Args:
        model: a :class:`~medseg.models.promptable.PromptableSegmenter` (the built-in ``litemedsam``).
        volume: ``(X, Y, Z)`` raw intensities (HU for CT, scanner units for MR) in the input file's array order.
        objects: each object's prompts in voxel indices of ``volume``: as the prompts file gives them
            (:func:`medseg.prompts.files.load_prompts`), or as :func:`object_prompts` makes them.
        recipe: intensity recipe (:func:`recipe_for`; default MR percentiles).
        slice_axis: the array axis the model slices along (2: the last).
        cache: embedding cache shared across objects, calls and (with a folder) processes; default a private one.
        propagation: carry and stop rules (its ``axis`` is replaced by ``slice_axis``).
        progress: show a progress bar over the slices of each propagation.
        batch_size: slices per encoder call, for flat boxes and propagation alike (default: the propagation
            config's, 4); 1 on CPU is as fast as any batch there.

    Returns:
        :class:`PromptedResult` with the label map (``uint8``, ``uint16`` above label 255).

    Raises:
        ConfigError: a volume that is not 3-D, or a bad ``slice_axis``.
        PromptFileError: an object with only negative points.
    """
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim != 3:
        raise ConfigError(f"segment_objects takes an (X, Y, Z) volume, got shape {array.shape}.")
    if slice_axis not in (0, 1, 2):
        raise ConfigError(f"--slice-axis must be 0, 1 or 2 (an array axis of the input), got {slice_axis}.")
    recipe = recipe or SliceRecipe("mr")
    cache = cache if cache is not None else EmbeddingCache()
    config = replace(propagation or PropagationConfig(), axis=slice_axis)
    if batch_size is not None:
        config = replace(config, batch_size=batch_size)
    prompts = [object_prompts(obj) for obj in objects]
    scaled = to_uint8(array, recipe, recipe.bounds(array))
    top = max((object_label(p) for p in prompts), default=0)
    labels = np.zeros(array.shape, dtype=np.uint8 if top <= 255 else np.uint16)
    notes: list[str] = []
    ahead = _FlatSlices(model, scaled, prompts, slice_axis, cache, config.batch_size)
    with _Encoder(model) as encoder:
        for item in prompts:
            mask = _object_mask(model, scaled, item, slice_axis, cache, config, progress, notes, ahead)
            labels[mask] = object_label(item)
    return PromptedResult(labels, encoder.count, notes)


def segment_image_objects(
    model: torch.nn.Module,
    image: MetaTensor,
    objects: Sequence[ObjectPrompts | Prompts],
    *,
    recipe: SliceRecipe | None = None,
    slice_axis: int = 2,
    cache: EmbeddingCache | None = None,
    progress: bool = False,
    batch_size: int | None = None,
) -> PromptedResult:
    """:func:`segment_objects` on a file as read, sliced on its RAS-oriented grid so every file order of one scan
    gives the same masks (module docstring).

    Args:
        model: the promptable model (the built-in ``litemedsam``).
        image: ``(1, X, Y, Z)`` MetaTensor as read (:func:`medseg.inference.cases.read_case`), affine in RAS+ mm.
        objects: prompts in voxel indices of ``image`` (the file's array order).
        slice_axis: the file's array axis to slice along (``--slice-axis``); the model slices the RAS-grid axis it
            becomes, so the planes are the same whatever the file's order.
        recipe, cache, progress, batch_size: as for :func:`segment_objects`.

    Returns:
        :class:`PromptedResult` whose ``labels`` are in the file's array order and shape.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ConfigError(f"segment_image_objects takes a (1, X, Y, Z) image, got shape {tuple(image.shape)}.")
    if slice_axis not in (0, 1, 2):
        raise ConfigError(f"--slice-axis must be 0, 1 or 2 (an array axis of the input), got {slice_axis}.")
    volume = prepare_volume(image)
    axis = int(volume.orientation.to_oriented[slice_axis, 0])
    oriented = [volume.orientation.prompts(object_prompts(obj)) for obj in objects]
    result = segment_objects(
        model, volume.image[0], oriented, recipe=recipe, slice_axis=axis, cache=cache, progress=progress,
        batch_size=batch_size,
    )  # fmt: skip
    return replace(result, labels=volume.native(result.labels))
