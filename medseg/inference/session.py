"""``SegmentationSession``: the interactive segmentation state behind the napari widget, without Qt or napari.

micro-sam keeps its widgets thin and its logic in library functions tested without a display; this is that logic for
one volume. It holds the volume, a promptable model, an :class:`~medseg.inference.cache.EmbeddingCache` and the label
map being built, and calls only :mod:`medseg.inference`:

- intensities go through the LiteMedSAM recipe's step 1 once for the whole volume (CT window, or MR percentiles of the
  whole volume as MedSAM's ``pre_CT_MR.py`` computes them), so a click on one slice and a propagation through all of
  them see the same slice bytes and share cache entries;
- :meth:`compute_embeddings` runs the encoder over slices ahead of time (in batches, with progress), so the clicks
  that follow only run the prompt encoder and mask decoder;
- :meth:`segment_slice` segments the current object on one slice from a box and/or points; a further call on the same
  slice for the same object reuses the cached embedding and feeds the previous logits back as SAM's mask input;
- :meth:`segment_volume` propagates a prompt through the volume (:func:`medseg.inference.propagate.propagate`);
- :meth:`next_object` moves on to the next label value (several objects or classes in one label map), and
  :meth:`save` writes the label map on the image's grid.

Masks are painted with the current label value over background and over the current object only, so an object never
erases another one already committed.

Given the image's affine (the napari reader keeps it in the layer's ``metadata["affine"]``), the session slices the
volume's RAS-oriented grid (:class:`~medseg.prompts.geometry.slicing.SliceOrientation`: axis permutation and flips,
no interpolation), as ``medseg predict`` does (:func:`medseg.inference.prompted.segment_image_objects`): LiteMedSAM is
not invariant to flipped or transposed slices, so without it a DICOM series and the NIfTI of the same scan (stored in
other array orders) would give different masks. Slice indices, boxes, points and :attr:`labels` stay in the file's
array order; only the model's slices are reoriented.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.errors import ConfigError, InputShapeError
from medseg.inference.cache import EmbeddingCache, embedding_key, weights_hash
from medseg.inference.loaded import LoadedModel
from medseg.inference.propagate import PropagationConfig, PropagationResult, propagate
from medseg.inference.recipe import SliceRecipe, SliceResult, embed_into_cache, predict_slice, to_uint8
from medseg.inference.writers import write_label_map
from medseg.prompts.contract import Prompts
from medseg.prompts.geometry.slicing import SliceOrientation

__all__ = ["InteractiveSession", "SegmentationSession", "guess_intensity"]

_PREPARED = SliceRecipe("none")  # the session's slices are already 0-255: the recipe's later steps only
_EMBEDDING_BYTES = 256 * 64 * 64 * 4  # one LiteMedSAM slice embedding, float32


def _prompts(
    box: Sequence[float] | None, points: Sequence[Sequence[float]] | None, point_labels: Sequence[int] | None
) -> Prompts:
    """The widget's box and points on one slice as the prompt set the path carries (no points: none)."""
    return Prompts.single(box, list(points) if points else None, point_labels if points else None)


def guess_intensity(volume: np.ndarray) -> str:
    """``ct`` when the volume holds Hounsfield units (air near -1000 HU), ``none`` when it is already 0-255 integers,
    ``mr`` otherwise: the default of the widget's intensity choice."""
    low, high = float(np.min(volume)), float(np.max(volume))
    if low <= -500:
        return "ct"
    if low >= 0 and high <= 255 and np.array_equal(volume, np.rint(volume)):
        return "none"
    return "mr"


class InteractiveSession(ABC):
    """What both interactive sessions (this module's and :class:`~medseg.inference.sam2_session.Sam2Session`) do the
    same way, whatever the model: the label map of objects in the file's array order (painted in place, so the
    widget's Labels layer shows it), the current object's label value, embedding progress and saving. A subclass sets
    :attr:`axis` and implements ``iter_embeddings``, the ``segment_*`` methods and ``clear_object``."""

    axis: int
    labels: np.ndarray
    label: int

    def _start_labels(self, labels: np.ndarray | None, shape: tuple[int, ...]) -> None:
        """Continue ``labels`` (painted in place) or start an empty ``uint16`` map; the next label is the highest."""
        if labels is None:
            labels = np.zeros(shape, dtype=np.uint16)
        elif np.shape(labels) != shape:
            raise InputShapeError(f"labels of shape {np.shape(labels)} do not match the volume {shape}.")
        self.labels = labels
        self.label = max(1, int(labels.max()) if labels.size else 1)

    @abstractmethod
    def iter_embeddings(self, indices: Sequence[int] | None = None, batch_size: int = 4) -> Iterator[tuple[int, int]]:
        """Encode the slices of ``indices`` (default all) not held yet, yielding ``(done, total)`` after each batch."""

    @abstractmethod
    def clear_object(self) -> None:
        """Erase the current object from the label map and forget what the model holds of it."""

    def compute_embeddings(
        self,
        indices: Sequence[int] | None = None,
        batch_size: int = 4,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Run the encoder on the slices not held yet; returns how many it ran on. ``progress(done, total)`` after
        each batch."""
        done = 0
        for done, total in self.iter_embeddings(indices, batch_size):
            if progress is not None:
                progress(done, total)
        return done

    def _paint(self, mask: np.ndarray, index: int | None) -> None:
        """Write ``mask`` (a file slice's, or the volume's when ``index`` is None) as the current object: over
        background and over the current object only, so an object never erases another one already committed."""
        target = self.labels if index is None else np.moveaxis(self.labels, self.axis, 0)[index]
        mine = target == self.label
        target[mine & ~mask] = 0
        target[mask & ((target == 0) | mine)] = self.label

    def next_object(self) -> int:
        """Commit the current object and move to a new label value (one above every value in use)."""
        self.label = max(self.label, int(self.labels.max())) + 1
        return self.label

    def select_object(self, label: int) -> None:
        """Continue with label value ``label`` (a class id, or an object to correct)."""
        if not 1 <= int(label) <= np.iinfo(self.labels.dtype).max:
            raise ConfigError(f"label values run from 1 to {np.iinfo(self.labels.dtype).max}, got {label}.")
        self.label = int(label)

    def save(self, path: str | os.PathLike[str], reference) -> Path:
        """Write :attr:`labels` as NIfTI on ``reference``'s grid (a NIfTI path or a 4x4 affine), atomically."""
        return write_label_map(self.labels, reference, path)


class SegmentationSession(InteractiveSession):
    """Interactive promptable segmentation of one ``(X, Y, Z)`` volume, slice by slice along ``axis``.

    Attributes:
        model: the promptable model (``encode``/``decode``, e.g. LiteMedSAM).
        axis: array axis of the file the slices are taken along (napari's sliced axis; 2 = axial for RAS volumes).
        slicing: the file's slices along ``axis`` <-> the RAS-oriented grid's the model sees (identity without an
            affine).
        labels: ``(X, Y, Z)`` ``uint16`` label map being built (0 background).
        label: the label value the next masks are painted with.
        cache: the embedding cache (per slice; keys follow :mod:`medseg.inference.cache`).
        encoded: slices run through the image encoder by this session (cache misses).
    """

    def __init__(
        self,
        model: LoadedModel | nn.Module,
        volume: np.ndarray,
        *,
        axis: int = 2,
        recipe: SliceRecipe | None = None,
        propagation: PropagationConfig | None = None,
        cache: EmbeddingCache | None = None,
        labels: np.ndarray | None = None,
        compile: bool = False,
        affine: np.ndarray | None = None,
    ) -> None:
        """Args:
        model: a :class:`LoadedModel` of kind ``promptable`` (``medseg.workflows.models.load_model``) or the
            model itself.
        volume: raw intensities (HU for CT, scanner units for MR, 0-255 with ``intensity="none"``).
        axis: slicing axis.
        recipe: intensity settings (default: :func:`guess_intensity`'s choice with the recipe's defaults).
        propagation: carry and stop rules for :meth:`segment_volume` (its ``axis`` is replaced by ``axis``).
        cache: embedding cache to share between sessions (default: a private one sized for every slice).
        labels: an existing label map to continue (same shape as ``volume``).
        compile: compile the model's prompt encoder and mask decoder (the click path) with ``torch.compile``
            (:meth:`~medseg.models.promptable.PromptableSegmenter.compile_decoder`: CUDA graphs on a GPU); the first
            click of each prompt layout pays the compilation. Worth it on a GPU only.
        affine: the volume's 4x4 voxel-to-RAS+ affine: the model slices the RAS-oriented grid (module docstring), so
            a DICOM series and the NIfTI of one scan give the same masks. ``None``: the array as given.

        Raises:
            ConfigError: a model that takes no prompts, or an axis outside 0-2.
            InputShapeError: a volume that is not 3-D, or labels of another shape.
        """
        if isinstance(model, LoadedModel):
            if model.kind != "promptable":
                raise ConfigError(
                    f"{model.source or 'this model'} is a {model.kind} model and takes no box or point prompts; "
                    f"choose litemedsam or a promptable run/release for interactive segmentation."
                )
            model = model.model
        if not (hasattr(model, "encode") and hasattr(model, "decode")):
            raise ConfigError(
                f"{type(model).__name__} has no encode/decode: interactive segmentation needs a "
                f"promptable model (litemedsam, or a run of model=promptable_2d)."
            )
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise InputShapeError(f"the session segments a 3-D (X, Y, Z) volume; got shape {volume.shape}.")
        self.slicing = SliceOrientation.from_affine(affine, volume.shape, axis)
        self.model = model.eval()
        if compile and getattr(model, "compiled_mode", None) is None:
            if not hasattr(model, "compile_decoder"):
                raise ConfigError(f"{type(model).__name__} has no compile_decoder: compile=True needs a SAM model.")
            model.compile_decoder()
        self.axis = axis
        self.recipe = recipe or SliceRecipe(guess_intensity(volume))
        self.propagation = replace(propagation or PropagationConfig(), axis=self.slicing.grid_axis)
        self.volume = volume
        prepared = to_uint8(volume, self.recipe, self.recipe.bounds(volume))  # percentiles: the same in any order
        self._slices = self.slicing.slices(prepared)  # the RAS grid's, slice axis first
        self.prepared = np.moveaxis(self._slices, 0, self.slicing.grid_axis)  # the RAS grid (a view)
        depth = self._slices.shape[0]
        if cache is None:  # not `cache or ...`: an empty cache has len 0 and is falsy
            cache = EmbeddingCache(max_items=max(256, depth), max_bytes=max(1 << 30, depth * _EMBEDDING_BYTES))
        self.cache = cache
        self._start_labels(labels, volume.shape)
        self.encoded = 0
        self._logits: dict[tuple[int, int], torch.Tensor] = {}

    # --- slices and embeddings -----------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Number of slices along :attr:`axis`."""
        return int(self._slices.shape[0])

    def slice(self, index: int) -> np.ndarray:
        """The prepared (0-255) slice ``index`` of the file, as the model sees it before resizing (on the RAS grid:
        transposed and flipped from the file's slice when the file is not stored in RAS order)."""
        return self._slices[self.slicing.grid_index(index)]

    def _key(self, index: int) -> str:
        size = self.model.image_size
        return embedding_key(self.slice(index), weights_hash(self.model), _PREPARED.signature(size, None))

    def is_embedded(self, index: int) -> bool:
        """Whether slice ``index``'s embedding is cached (a click there skips the encoder)."""
        return self.cache.get(self._key(index)) is not None

    def iter_embeddings(self, indices: Sequence[int] | None = None, batch_size: int = 4) -> Iterator[tuple[int, int]]:
        """Compute the missing embeddings of ``indices`` (default: every slice), yielding ``(done, total)`` after
        each batch so that a caller (the widget's background worker) can show progress."""
        wanted = list(range(self.depth)) if indices is None else [int(i) for i in indices]  # the file's indices
        missing = [i for i in wanted if not self.is_embedded(i)]
        total = len(missing)
        yield 0, total
        with torch.inference_mode():
            for start in range(0, total, max(1, batch_size)):
                chunk = missing[start : start + batch_size]
                planes = np.stack([self.slice(i) for i in chunk])
                embed_into_cache(self.model, planes, [self._key(i) for i in chunk], self.cache)
                self.encoded += len(chunk)
                yield start + len(chunk), total

    # --- segmentation ---------------------------------------------------------------------------------------------

    def segment_slice(
        self,
        index: int,
        box: Sequence[float] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
        *,
        refine: bool = True,
    ) -> SliceResult:
        """Segment the current object on slice ``index`` and paint it into :attr:`labels`.

        Args:
            index: slice index along :attr:`axis`.
            box: inclusive ``(i0, j0, i1, j1)`` in the slice's array order (axes other than :attr:`axis`).
            points: ``(i, j)`` clicks on the slice; ``point_labels`` 1 positive, 0 negative.
            refine: feed this object's previous logits on this slice back as SAM's mask input (each further click
                refines the last mask); ``False`` starts over from the prompts alone.

        Returns:
            The slice's result, its ``mask`` on the file's slice (``logits`` stay on the model's grid).

        Raises:
            ConfigError: no prompt at all, or a slice outside the volume.
        """
        if box is None and not points:
            raise ConfigError("segment_slice needs a box or at least one point on the slice; draw one first.")
        slice_2d = self.slice(index)
        box, points = self.slicing.prompts(index, box, points)
        previous = self._logits.get((self.label, index)) if refine else None
        misses = self.cache.misses
        result = predict_slice(
            self.model,
            slice_2d,
            prev_mask=previous,
            recipe=_PREPARED,
            cache=self.cache,
            threshold=self.propagation.threshold,
            prompts=_prompts(box, points, point_labels),
        )
        self.encoded += self.cache.misses - misses
        self._logits[(self.label, index)] = result.logits
        result = replace(result, mask=self.slicing.file_plane(result.mask))
        self._paint(result.mask, index)
        return result

    def segment_volume(
        self,
        index: int,
        box: Sequence[float] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
    ) -> PropagationResult:
        """Segment the current object through the volume from a prompt on slice ``index`` (slice propagation), and
        replace the object in :attr:`labels` by the result. Embeddings already computed are reused.

        Returns:
            The propagation, its ``mask`` in the file's array order and ``first``/``last`` the file's slices."""
        if box is None and not points:
            raise ConfigError("segment_volume needs a box (or points) on the current slice to start from.")
        start = self.slicing.grid_index(index)
        box, points = self.slicing.prompts(index, box, points)
        result = propagate(
            self.model,
            self.prepared,
            start,
            prompts=_prompts(box, points, point_labels),
            recipe=_PREPARED,
            config=self.propagation,
            cache=self.cache,
        )
        self.encoded += result.encoded
        first, last = self.slicing.file_range(result.first, result.last)
        result = replace(result, mask=self.slicing.native(result.mask), first=first, last=last)
        self._paint(result.mask, None)
        return result

    # --- objects and output -------------------------------------------------------------------------------------

    def clear_object(self) -> None:
        """Erase the current object from the label map and forget its masks."""
        self.labels[self.labels == self.label] = 0
        self._logits = {key: value for key, value in self._logits.items() if key[0] != self.label}
