"""``Sam2Session``: the napari widget's interactive state for SAM 2 / MedSAM2, with memory across slices.

The same public surface as :class:`~medseg.inference.session.SegmentationSession` (what the widget calls), so the
widget only chooses the class (:func:`~medseg.inference.sam2_frames.is_sam2_model`); the work is SAM 2's:

- the volume's slices along ``axis`` are SAM 2 frames (:class:`~medseg.inference.sam2_frames.Sam2Frames`: the
  intensity recipe's 0-255 step once for the whole volume, then ``[0, 1]``, resized, ImageNet-normalised), encoded
  on demand or ahead of time (:meth:`iter_embeddings`, within a byte budget);
- every object (label value) has its own memory (:class:`~medseg.inference.sam2_propagation.Sam2Tracker`);
- :meth:`segment_slice` prompts one slice: a slice the object has not reached yet is segmented from its prompts
  alone, a slice it has reached with the memory of the others and its previous logits (each further click refines);
  only that slice is painted;
- :meth:`segment_volume` prompts a slice and propagates: the object's first prompt both ways through the volume, a
  later one (a correction) onward from its slice only (away from the first prompted slice); the object's slices in
  the label map are replaced by what its memory holds.

Masks are painted with the current label value over background and over the current object only, as in
:class:`~medseg.inference.session.SegmentationSession`.

Given the image's affine (the widget passes the layer's ``metadata["affine"]``), the frames are the slices of the
volume's RAS-oriented grid (:class:`~medseg.prompts.geometry.slicing.SliceOrientation`: axis permutation and flips,
no interpolation), as in :class:`~medseg.inference.session.SegmentationSession` and ``medseg predict``'s SAM 2 path:
SAM 2 is not invariant to a flipped or transposed slice, and its memory walks the slices in the grid's order, so a
DICOM series and the NIfTI of one scan give the same masks. Slice indices, boxes, points, :attr:`labels` and the
propagation's ``first``/``last`` stay in the file's array order; only the frames (and the trackers' slice numbers)
are the grid's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from medseg.errors import ConfigError, InputShapeError
from medseg.inference.loaded import LoadedModel
from medseg.inference.propagate import PropagationConfig, PropagationResult
from medseg.inference.recipe import SliceRecipe, SliceResult
from medseg.inference.sam2_frames import Sam2Frames, sam2_of, unit_volume
from medseg.inference.sam2_propagation import Sam2Tracker
from medseg.inference.session import InteractiveSession, guess_intensity
from medseg.prompts.contract import Prompts
from medseg.prompts.geometry.slicing import SliceOrientation

__all__ = ["Sam2Session"]

_SESSION_BYTES = 2 << 30  # frame features kept by a session (about 128 slices at 1024 px, 512 at MedSAM2's 512 px)


def _prompts(box, points, point_labels) -> Prompts:
    return Prompts.single(box, list(points) if points else None, point_labels if points else None)


class Sam2Session(InteractiveSession):
    """Interactive SAM 2 segmentation of one ``(X, Y, Z)`` volume along ``axis`` (module docstring).

    Attributes:
        model: the ``SAM2Base``.
        axis: the slice axis (the file's array axis).
        slicing: the file's slices along ``axis`` <-> the RAS-oriented grid's, which are the frames (identity without
            an affine).
        recipe: the intensity recipe (default :func:`~medseg.inference.session.guess_intensity`'s choice).
        propagation: stop rules and threshold of propagation (``axis`` replaced by the grid's slice axis).
        labels: ``(X, Y, Z)`` ``uint16`` label map being built.
        label: the label value the next masks are painted with.
        cache: the frame features (:class:`Sam2Frames`), shareable with a later session of the same slices.
        encoded: slices run through the image encoder by this session.
    """

    def __init__(
        self,
        model: LoadedModel | nn.Module,
        volume: np.ndarray,
        *,
        axis: int = 2,
        recipe: SliceRecipe | None = None,
        propagation: PropagationConfig | None = None,
        cache: Sam2Frames | None = None,
        labels: np.ndarray | None = None,
        max_bytes: int = _SESSION_BYTES,
        affine: np.ndarray | None = None,
    ) -> None:
        """Raises: ConfigError (not a SAM 2 model, a bad axis), InputShapeError (not 3-D, labels of another shape).

        ``cache`` is used only when it holds this volume's slices as prepared here (else a new one is made).
        ``affine``: the volume's 4x4 voxel-to-RAS+ affine; the frames are the RAS-oriented grid's slices (module
        docstring). ``None``: the array as given. ``labels`` (default a new map) is painted in place, in the file's
        array order.
        """
        if isinstance(model, LoadedModel):
            if model.kind != "promptable":
                raise ConfigError(f"{model.source or 'this model'} is a {model.kind} model and takes no prompts.")
            model = model.model
        sam2 = sam2_of(model)
        if sam2 is None:
            raise ConfigError(
                f"{type(model).__name__} is not a SAM 2 model; Sam2Session needs a SAM 2 / MedSAM2 file or a "
                f"fine-tuned SAM 2 run (SegmentationSession serves the other promptable models)."
            )
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise InputShapeError(f"the session segments a 3-D (X, Y, Z) volume; got shape {volume.shape}.")
        self.slicing = SliceOrientation.from_affine(affine, volume.shape, axis)
        self.model, self.axis, self.volume = sam2.eval(), axis, volume
        self.recipe = recipe or SliceRecipe(guess_intensity(volume))
        self.propagation = replace(propagation or PropagationConfig(), axis=self.slicing.grid_axis)
        slices = self.slicing.slices(unit_volume(volume, self.recipe))  # whole-volume scale: the same in any order
        same = isinstance(cache, Sam2Frames) and cache.model is sam2 and cache.slices.shape == slices.shape
        if same and np.array_equal(cache.slices, slices):
            self.cache = cache
        else:
            self.cache = Sam2Frames(sam2, slices, self.propagation.batch_size, max_bytes)
        self._start_labels(labels, volume.shape)
        self._start = self.cache.encoded
        self._trackers: dict[int, Sam2Tracker] = {}

    @property
    def encoded(self) -> int:
        return self.cache.encoded - self._start

    @property
    def depth(self) -> int:
        """Number of slices along :attr:`axis`."""
        return self.cache.depth

    def is_embedded(self, index: int) -> bool:
        """Whether slice ``index``'s features are held (a prompt there skips the encoder)."""
        return self.cache.is_encoded(self.slicing.grid_index(index))

    def iter_embeddings(self, indices: Sequence[int] | None = None, batch_size: int = 4) -> Iterator[tuple[int, int]]:
        """Encode the slices of ``indices`` (default all) not held yet, yielding ``(done, total)`` after each batch.
        Beyond the byte budget the least recently used slices are dropped again."""
        wanted = list(range(self.depth)) if indices is None else [self.slicing.grid_index(i) for i in indices]
        missing = [i for i in wanted if not self.cache.is_encoded(i)]
        yield 0, len(missing)
        with torch.inference_mode():
            for start in range(0, len(missing), max(1, batch_size)):
                self.cache.ensure(missing[start : start + batch_size])
                yield min(start + batch_size, len(missing)), len(missing)

    def _tracker(self) -> Sam2Tracker:
        if self.label not in self._trackers:
            self._trackers[self.label] = Sam2Tracker(self.cache, self.propagation)
        return self._trackers[self.label]

    def segment_slice(
        self,
        index: int,
        box: Sequence[float] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
        *,
        refine: bool = True,
    ) -> SliceResult:
        """Segment the current object on slice ``index`` (module docstring) and paint that slice.

        Args:
            box, points, point_labels: the slice's prompts in its array order (they replace the slice's earlier ones).
            refine: use the object's memory and previous logits on this slice; ``False`` starts over from the prompts.

        Returns:
            The slice's result, its ``mask`` on the file's slice (``logits`` stay on the model's grid).
        """
        if box is None and not points:
            raise ConfigError("segment_slice needs a box or at least one point on the slice; draw one first.")
        frame, tracker = self.slicing.grid_index(index), self._tracker()
        box, points = self.slicing.prompts(index, box, points)
        if not refine:
            tracker.forget(frame)
        with torch.inference_mode():
            mask = self.slicing.file_plane(tracker.prompt(frame, _prompts(box, points, point_labels)))
        self._paint(mask, index)
        logits = tracker.outputs["cond_frame_outputs"][frame]["pred_masks"].float()
        return SliceResult(mask=mask, logits=logits, iou=tracker.ious.get(frame, float("nan")))

    def segment_volume(
        self,
        index: int,
        box: Sequence[float] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
    ) -> PropagationResult:
        """Prompt slice ``index`` and propagate the current object with SAM 2's memory (module docstring).

        Returns:
            The object, its ``mask`` in the file's array order and ``first``/``last`` the file's slices."""
        if box is None and not points:
            raise ConfigError("segment_volume needs a box (or points) on the current slice to start from.")
        frame, tracker = self.slicing.grid_index(index), self._tracker()
        box, points = self.slicing.prompts(index, box, points)
        walk = tracker.correct(frame, _prompts(box, points, point_labels))
        grid = tracker.result(walk, self.slicing.grid_axis)
        first, last = self.slicing.file_range(grid.first, grid.last)
        result = replace(grid, mask=self.slicing.native(grid.mask), first=first, last=last, encoded=self.encoded)
        self._paint(result.mask, None)
        return result

    def clear_object(self) -> None:
        """Erase the current object from the label map and forget its memory."""
        self.labels[self.labels == self.label] = 0
        self._trackers.pop(self.label, None)
