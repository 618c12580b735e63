"""medseg's promptable models under the CVPR 2025 SegFM3D protocol (:mod:`medseg.evaluation.segfm3d`), on a test
case's native voxels.

The case is read as the other interactive evaluation reads it (:func:`medseg.evaluation.interactive_run.
load_native_case`: the run's intensity transforms, RAS by permutation and flips only), so every click and score is on
the file's voxels. Each class gets an :class:`~medseg.evaluation.segfm3d.ObjectSession` that turns the protocol's
prompts into a 3-D mask with medseg's one promptable path:

- :class:`VolumeSession`, a 3-D promptable model: :func:`medseg.inference.volumetric.volume_predictor` (the volume
  min-max scaled and zoomed to the training spacing as in :func:`~medseg.evaluation.interactive_run.
  evaluate_case_3d`); the box is the challenge's 3-D box, each click step sends the box and every click so far with
  the model's previous logits as mask prompt. Each class has its own predictor; the window embeddings are shared by
  all classes (:class:`~medseg.inference.volumetric.WindowEncodings`), so each window is encoded once per case.
- :class:`PropagationSession`, a 2-D model (LiteMedSAM and the 2-D promptable runs): the box's in-plane part on its
  ``z_mid`` slice, propagated (:func:`medseg.inference.propagate.propagate`) within the box's slice range, MedSAM's
  3-D inference. A click re-segments its slice with the clicks on that slice and the box of the class's current mask
  there (a box-trained model keeps the object), then propagates from that slice: the slices it reaches are replaced,
  the others kept. A click outside the slice range widens it. Slice embeddings are cached for the whole case.

- :class:`MemorySession`, a SAM 2 / MedSAM2 model (a fine-tuned run holding ``sam2``): the box's in-plane part on its
  ``z_mid`` slice, then SAM 2's memory carries the object through the box's slice range in both directions
  (:class:`~medseg.inference.sam2_propagation.Sam2Tracker`). A click is a correction: its slice is prompted with
  every click on it (and the box on ``z_mid``), decoded with the memory of the other slices and its previous logits,
  and the object re-propagated onward from it (away from ``z_mid``); the slices before it keep their masks. A click
  outside the slice range widens it. The slices' features are shared by all classes of the case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from medseg.errors import ConfigError
from medseg.evaluation.interactive_run import InteractiveSettings, NativeCase
from medseg.evaluation.metrics import foreground_classes
from medseg.evaluation.segfm3d import ChallengeBox, Click, ObjectSession, Segfm3dSettings, run_case
from medseg.inference.cache import EmbeddingCache
from medseg.inference.prepared import model_grid
from medseg.inference.prompted_run import RUN_RECIPE
from medseg.inference.propagate import PropagationConfig, propagate
from medseg.inference.recipe import SliceRecipe, minmax_per_image
from medseg.inference.sam2_frames import Sam2Frames, is_sam2_model, unit_volume
from medseg.inference.sam2_propagation import Sam2Tracker
from medseg.inference.volumetric import WindowEncodings, volume_predictor
from medseg.prompts.contract import Prompts, pad_points
from medseg.prompts.geometry import prompts_on_slice

__all__ = [
    "MemorySession",
    "PropagationSession",
    "VolumeSession",
    "evaluate_case_segfm3d",
    "object_sessions",
    "protocol_classes",
]


class VolumeSession:
    """A 3-D promptable model's answers for one class (module docstring)."""

    def __init__(self, model: torch.nn.Module, volume: torch.Tensor, model_shape: Sequence[int], overlap: float):
        self._predict = volume_predictor(model, volume, model_shape, overlap)
        self._box: np.ndarray | None = None
        self._previous: torch.Tensor | None = None

    def _run(self, prompts: Prompts) -> np.ndarray:
        mask = (self._predict(prompts, self._previous) > 0.5).cpu()
        self._previous = mask.float()[None, None]  # the predictor refines its own logits when given a previous mask
        return mask.numpy()

    def box(self, box: ChallengeBox) -> np.ndarray:
        self._box = box.box6()[None]
        return self._run(Prompts(box=self._box))

    def click(self, clicks: Sequence[Click]) -> np.ndarray:
        coords, labels = pad_points([[c for c, _ in clicks]], [[label for _, label in clicks]])
        return self._run(Prompts(point_coords=coords, point_labels=labels, box=self._box))


class PropagationSession:
    """A 2-D promptable model's answers for one class: slice prompts and propagation (module docstring)."""

    def __init__(self, model: torch.nn.Module, volume: np.ndarray, config: PropagationConfig, cache: EmbeddingCache):
        self.model, self.volume, self.config, self.cache = model, volume, config, cache
        self.mask = np.zeros(volume.shape, dtype=bool)
        self.lo, self.hi = 0, volume.shape[config.axis] - 1

    def _propagate(self, index: int, prompts: Prompts | None) -> np.ndarray:
        axis = self.config.axis
        view = np.moveaxis(self.mask, axis, 0)  # writes go through to self.mask
        view[index] = False  # the prompted slice is always replaced
        if prompts is not None:
            inside = np.take(self.volume, np.arange(self.lo, self.hi + 1), axis=axis)
            result = propagate(
                self.model, inside, index - self.lo, prompts=prompts, recipe=RUN_RECIPE, config=self.config,
                cache=self.cache,
            )  # fmt: skip
            if result.last >= result.first:
                kept = slice(result.first, result.last + 1)
                view[self.lo + result.first : self.lo + result.last + 1] = np.moveaxis(result.mask, axis, 0)[kept]
        return self.mask.copy()

    def box(self, box: ChallengeBox) -> np.ndarray:
        axis = self.config.axis
        self.lo, self.hi = box.lo[axis], box.hi[axis]
        return self._propagate(box.mid, prompts_on_slice(Prompts(box=box.box6()[None]), axis, box.mid))

    def click(self, clicks: Sequence[Click]) -> np.ndarray:
        axis = self.config.axis
        index = int(clicks[-1][0][axis])
        self.lo, self.hi = min(self.lo, index), max(self.hi, index)
        here = [(c, label) for c, label in clicks if int(c[axis]) == index]
        coords, labels = pad_points([[c for c, _ in here]], [[label for _, label in here]])
        region = np.take(self.mask, index, axis=axis).copy()
        for coord, label in here:
            if label == 1:
                region[tuple(v for a, v in enumerate(coord) if a != axis)] = True
        fields: dict[str, Any] = {"point_coords": coords, "point_labels": labels}
        if np.take(self.mask, index, axis=axis).any():  # keep the object: the box of its mask there (and the clicks)
            rows, cols = np.nonzero(region)
            lo, hi = [int(rows.min()), int(cols.min())], [int(rows.max()), int(cols.max())]
            lo.insert(axis, index)
            hi.insert(axis, index)
            fields["box"] = np.asarray([lo + hi], dtype=np.float32)
        return self._propagate(index, prompts_on_slice(Prompts(**fields), axis, index))


class MemorySession:
    """A SAM 2 model's answers for one class: memory propagation and corrections (module docstring)."""

    def __init__(self, frames: Sam2Frames, config: PropagationConfig):
        self.tracker, self.axis = Sam2Tracker(frames, config), config.axis
        self.lo, self.hi, self.mid = 0, frames.depth - 1, None
        self._box: np.ndarray | None = None

    def _mask(self) -> np.ndarray:
        return np.moveaxis(self.tracker.volume_mask(), 0, self.axis)

    def box(self, box: ChallengeBox) -> np.ndarray:
        self.lo, self.hi, self.mid, self._box = box.lo[self.axis], box.hi[self.axis], box.mid, box.box6()[None]
        self.tracker.correct(box.mid, prompts_on_slice(Prompts(box=self._box), self.axis, box.mid), self.lo, self.hi)
        return self._mask()

    def click(self, clicks: Sequence[Click]) -> np.ndarray:
        index = int(clicks[-1][0][self.axis])
        self.lo, self.hi = min(self.lo, index), max(self.hi, index)
        here = [(c, label) for c, label in clicks if int(c[self.axis]) == index]
        coords, labels = pad_points([[c for c, _ in here]], [[label for _, label in here]])
        box = self._box if index == self.mid else None  # the box's slice keeps its box with the clicks
        prompts = prompts_on_slice(Prompts(point_coords=coords, point_labels=labels, box=box), self.axis, index)
        self.tracker.correct(index, prompts, self.lo, self.hi)
        return self._mask()


def protocol_classes(
    label: np.ndarray, labels: Mapping[str, int | Sequence[int]], max_objects: int | None = None
) -> dict[str, int]:
    """``{name: value}`` of the foreground classes present in ``label``, in ``labels`` order, at most ``max_objects``.

    Raises:
        ConfigError: a class is a region of several labels (the protocol's one label map holds one value per class).
    """
    classes = {}
    for name, values in foreground_classes(labels).items():
        if len(values) != 1:
            raise ConfigError(
                f"class {name!r} is a region of labels {list(values)}; the segfm3d protocol paints one label value per "
                f"class. Use task.evaluation.protocol=dice_at_k for region classes."
            )
        if (label == values[0]).any():
            classes[name] = int(values[0])
    items = list(classes.items())
    return dict(items if max_objects is None else items[:max_objects])


def object_sessions(
    model: torch.nn.Module,
    case: NativeCase,
    names: Sequence[str],
    settings: InteractiveSettings,
    slice_axis: int = 2,
    target_spacing: Sequence[float] | None = None,
    overlap: float = 0.25,
    cache: EmbeddingCache | None = None,
) -> dict[str, ObjectSession]:
    """One session per class name: :class:`MemorySession` for a SAM 2 model, :class:`VolumeSession` for a 3-D model,
    :class:`PropagationSession` for a 2-D one.

    Raises:
        ConfigError: a multi-channel image for a 2-D or SAM 2 model (their slice recipe reads one channel).
    """
    if is_sam2_model(model) and case.image.shape[0] == 1:
        config = PropagationConfig(axis=slice_axis, **dict(settings.propagation or {}))
        slices = np.moveaxis(unit_volume(case.image[0], SliceRecipe("none")), slice_axis, 0)
        frames = Sam2Frames(model, slices, config.batch_size)  # shared by the classes: each slice encoded once
        return {name: MemorySession(frames, config) for name in names}
    if int(getattr(model, "spatial_dims", 2)) == 3:
        volume = minmax_per_image(torch.from_numpy(case.image).float()[None])[0]
        shape = model_grid(case.label.shape, case.spacing, target_spacing)
        shared = WindowEncodings(model)
        return {name: VolumeSession(shared, volume, shape, overlap) for name in names}
    if case.image.shape[0] != 1:
        raise ConfigError(
            f"case {case.case_id} has {case.image.shape[0]} channels; a 2-D model's slice recipe reads one channel."
        )
    config = PropagationConfig(axis=slice_axis, **dict(settings.propagation or {}))  # null: the default rules
    cache = cache if cache is not None else EmbeddingCache(max_items=4096)
    return {name: PropagationSession(model, case.image[0], config, cache) for name in names}


def evaluate_case_segfm3d(
    model: torch.nn.Module,
    case: NativeCase,
    labels: Mapping[str, int | Sequence[int]],
    settings: InteractiveSettings,
    slice_axis: int = 2,
    target_spacing: Sequence[float] | None = None,
    overlap: float = 0.25,
    cache: EmbeddingCache | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray]:
    """The SegFM3D protocol on one native case: its entry of the ``protocol`` section and its last label map.

    Args:
        settings: ``task.evaluation`` (``segfm3d`` holds the protocol's options, ``max_objects`` caps the classes,
            ``propagation`` sets a 2-D model's propagation rules).
        slice_axis: the boxes' slice axis, and a 2-D model's.
        target_spacing, overlap: a 3-D model's training spacing and sliding-window overlap.
        cache: a 2-D model's slice embeddings.
        seed: seeds the boxes' random widening.

    Returns:
        ``(result, label_map)`` as :func:`medseg.evaluation.segfm3d.run_case` gives them, on the reoriented grid; a case
        without a foreground class gives ``{"classes": [], "skipped": reason}`` and an empty label map.
    """
    classes = protocol_classes(case.label, labels, settings.max_objects)
    if not classes:  # a case without foreground (a healthy scan): nothing to prompt, left out of the means
        return {"classes": [], "skipped": "no foreground class in the reference"}, np.zeros(case.label.shape, np.int64)
    sessions = object_sessions(model, case, list(classes), settings, slice_axis, target_spacing, overlap, cache)
    protocol = Segfm3dSettings.from_mapping(settings.segfm3d)
    return run_case(sessions, case.label, classes, case.spacing, protocol, axis=slice_axis, seed=seed)
