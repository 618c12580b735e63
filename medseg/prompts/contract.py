"""The tensor prompt contract shared by the promptable models, the training task, propagation and evaluation.

It follows MONAI VISTA3D's batch keys, so a user of VISTA3D finds the names and meanings they know:

==================  ===================  =================================================================
key                 shape                meaning
==================  ===================  =================================================================
``point_coords``    ``[B, N, D]`` float  click positions, voxel (pixel) indices in the tensor's own array
                                         space, in array order ``(i, j, k)`` for 3D and ``(i, j)`` for 2D
``point_labels``    ``[B, N]`` long      ``1`` positive, ``0`` negative, ``-1`` padding (ignored)
``box``             ``[B, 2D]`` float    ``(i0, j0, k0, i1, j1, k1)`` in 3D, ``(i0, j0, i1, j1)`` in 2D,
                                         inclusive voxel indices (``i1`` is the last voxel inside)
``class_vector``    ``[B, K]`` long      class ids the prompt set asks for (``K = 1`` for one object)
``prev_mask``       ``[B, 1, *spatial]`` the previous prediction (logits or probabilities) to refine
==================  ===================  =================================================================

``D`` is the number of spatial dimensions: 3 for volumes, 2 for slices. Coordinates are always in *array order*,
the order in which the tensor is indexed (``mask[i, j, k]``), never SAM's ``(x, y)`` = ``(column, row)`` order: a
2D SAM wrapper flips the last axis itself (``coords.flip(-1)``). Integer coordinates name voxel centres.

Every field is optional, but a prompt set holds at least one of points, box or class. Everything is checked on
construction, so a malformed prompt fails where it is made, with a message naming the field, rather than deep inside
a model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from medseg.errors import MedsegError

__all__ = ["PROMPT_KEYS", "PromptError", "Prompts", "collate_prompts", "pad_points"]

PROMPT_KEYS = ("point_coords", "point_labels", "box", "class_vector", "prev_mask")


class PromptError(MedsegError, ValueError):
    """A prompt (click, box, class, previous mask, prompts file) is malformed or lies outside its volume."""


def _tensor(value: object, dtype: torch.dtype, name: str) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        tensor = value.as_tensor() if hasattr(value, "as_tensor") else value
        return tensor.to(dtype) if tensor.dtype != dtype else tensor
    try:
        return torch.as_tensor(np.asarray(value), dtype=dtype)
    except (TypeError, ValueError) as error:
        raise PromptError(f"{name} must be a tensor or array of numbers, got {type(value).__name__}: {error}") from None


@dataclass(frozen=True)
class Prompts:
    """One batch of prompts in the VISTA3D layout (see the module docstring for shapes and units).

    Attributes:
        point_coords: ``[B, N, D]`` float voxel indices (array order), or ``None``.
        point_labels: ``[B, N]`` long, values in ``{-1, 0, 1}``; required with ``point_coords``.
        box: ``[B, 2D]`` float inclusive voxel box ``(lo..., hi...)``, or ``None``.
        class_vector: ``[B, K]`` long class ids, or ``None``.
        prev_mask: ``[B, 1, *spatial]`` float logits or probabilities of the previous prediction, or ``None``.

    Raises:
        PromptError: on construction, when a shape, dtype-convertible value or label is wrong.
    """

    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    box: torch.Tensor | None = None
    class_vector: torch.Tensor | None = None
    prev_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise the dtypes once, here
        set_(self, "point_coords", _tensor(self.point_coords, torch.float32, "point_coords"))
        set_(self, "point_labels", _tensor(self.point_labels, torch.long, "point_labels"))
        set_(self, "box", _tensor(self.box, torch.float32, "box"))
        set_(self, "class_vector", _tensor(self.class_vector, torch.long, "class_vector"))
        set_(self, "prev_mask", _tensor(self.prev_mask, torch.float32, "prev_mask"))
        self._validate()

    def _validate(self) -> None:
        coords, labels, box = self.point_coords, self.point_labels, self.box
        if coords is None and box is None and self.class_vector is None:
            raise PromptError(
                "a prompt set needs at least one of point_coords (+ point_labels), box or class_vector; all are None."
            )
        if (coords is None) != (labels is None):
            raise PromptError("point_coords and point_labels go together: give both ([B, N, D] and [B, N]) or neither.")
        batch = {}
        if coords is not None:
            if coords.ndim != 3 or coords.shape[-1] not in (2, 3):
                raise PromptError(f"point_coords must be [B, N, 2] or [B, N, 3], got {tuple(coords.shape)}.")
            if labels.shape != coords.shape[:2]:
                raise PromptError(
                    f"point_labels must be [B, N] = {tuple(coords.shape[:2])} to match point_coords, got "
                    f"{tuple(labels.shape)}; pad both with pad_points (label -1 for padding)."
                )
            bad = labels[(labels != -1) & (labels != 0) & (labels != 1)]
            if bad.numel():
                raise PromptError(
                    f"point_labels must be 1 (positive), 0 (negative) or -1 (padding), got {sorted(set(bad.tolist()))}."
                )
            if not torch.isfinite(coords).all():
                raise PromptError("point_coords holds NaN or infinite values; padded points need finite coordinates.")
            batch["point_coords"] = coords.shape[0]
        if box is not None:
            if box.ndim != 2 or box.shape[-1] not in (4, 6):
                raise PromptError(f"box must be [B, 6] (3D) or [B, 4] (2D), got {tuple(box.shape)}.")
            finite = torch.isfinite(box).all(-1)
            if not finite.all():
                raise PromptError(f"box {box[~finite][0].tolist()} holds NaN or infinite values; give finite indices.")
            dims = box.shape[-1] // 2
            if coords is not None and coords.shape[-1] != dims:
                raise PromptError(
                    f"box is {dims}D ({box.shape[-1]} numbers) but point_coords are {coords.shape[-1]}D; use one "
                    f"spatial dimensionality for a prompt set."
                )
            if (box[:, dims:] < box[:, :dims]).any():
                raise PromptError(
                    f"box must be (lo..., hi...) with hi >= lo on every axis (inclusive voxel indices), got "
                    f"{box.tolist()}."
                )
            batch["box"] = box.shape[0]
        if self.class_vector is not None:
            if self.class_vector.ndim != 2:
                raise PromptError(f"class_vector must be [B, K], got {tuple(self.class_vector.shape)}.")
            batch["class_vector"] = self.class_vector.shape[0]
        if self.prev_mask is not None:
            mask = self.prev_mask
            if mask.ndim not in (4, 5) or mask.shape[1] != 1:
                raise PromptError(f"prev_mask must be [B, 1, *spatial] (2D or 3D), got {tuple(mask.shape)}.")
            dims = self.spatial_dims
            if dims is not None and mask.ndim - 2 != dims:
                raise PromptError(f"prev_mask is {mask.ndim - 2}D but the points/box are {dims}D.")
            batch["prev_mask"] = mask.shape[0]
        if len(set(batch.values())) > 1:
            raise PromptError(f"every prompt field needs the same batch size B, got {batch}.")

    @property
    def batch_size(self) -> int:
        """B, the number of prompt sets (one per object to segment)."""
        for value in (self.point_coords, self.box, self.class_vector, self.prev_mask):
            if value is not None:
                return int(value.shape[0])
        raise AssertionError("unreachable: validation requires one field")

    @property
    def spatial_dims(self) -> int | None:
        """2 or 3 from the points or box; ``None`` for a class-only prompt set."""
        if self.point_coords is not None:
            return int(self.point_coords.shape[-1])
        if self.box is not None:
            return int(self.box.shape[-1]) // 2
        return None

    def check_bounds(self, spatial_shape: Sequence[int]) -> None:
        """Raise :class:`PromptError` unless every real point and every box lies inside ``spatial_shape`` (voxels).

        Coordinates are voxel centres, so the valid range on an axis of size ``n`` is ``[0, n - 1]``.
        """
        shape = torch.as_tensor([int(s) for s in spatial_shape], dtype=torch.float32)
        dims = self.spatial_dims
        if dims is not None and len(shape) != dims:
            raise PromptError(f"the prompts are {dims}D but the volume shape {tuple(spatial_shape)} is not.")
        if self.point_coords is not None:
            real = self.point_labels >= 0
            coords = self.point_coords[real]
            outside = ((coords < 0) | (coords > shape - 1)).any(-1)
            if outside.any():
                raise PromptError(
                    f"point {coords[outside][0].tolist()} lies outside the volume of shape {tuple(spatial_shape)} "
                    f"(valid indices 0..n-1 per axis); convert world (mm) prompts with medseg.prompts.geometry first."
                )
        if self.box is not None:
            lo, hi = self.box[:, :dims], self.box[:, dims:]
            outside = ((lo < 0) | (hi > shape - 1)).any(-1)
            if outside.any():
                raise PromptError(
                    f"box {self.box[outside][0].tolist()} lies outside the volume of shape {tuple(spatial_shape)}."
                )

    def __getitem__(self, index: int) -> Prompts:
        """Prompt set ``index`` as a batch of one (padding points kept)."""
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"prompt set {index} of a batch of {self.batch_size}")
        index = index % self.batch_size
        return Prompts(**{key: value[index : index + 1] for key, value in self.as_dict().items()})

    def to(self, device: torch.device | str) -> Prompts:
        """A copy with every tensor on ``device``."""
        moved = copy.copy(self)  # already validated: moving does not change shapes or values, so skip the checks
        for field in fields(self):
            object.__setattr__(moved, field.name, _move(getattr(self, field.name), device))
        return moved

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The non-empty fields under the batch-dict keys of :data:`PROMPT_KEYS`."""
        return {key: getattr(self, key) for key in PROMPT_KEYS if getattr(self, key) is not None}

    @classmethod
    def single(
        cls,
        box: Sequence[float] | np.ndarray | None = None,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        point_labels: Sequence[int] | np.ndarray | None = None,
    ) -> Prompts:
        """One prompt set (``B = 1``) from plain coordinates, e.g. a box drawn or typed by hand.

        Args:
            box: inclusive ``(lo..., hi...)``, array order.
            points: ``(N, D)`` clicks, array order.
            point_labels: ``(N,)`` 1 positive, 0 negative; default all positive.
        """
        fields: dict[str, np.ndarray] = {}
        if box is not None:
            fields["box"] = np.asarray(box, dtype=np.float32).reshape(1, -1)
        if points is not None:
            coords = np.asarray(points, dtype=np.float32)
            coords = coords.reshape(1, -1, coords.shape[-1] if coords.size else 2)
            labels = np.ones(coords.shape[1], np.int64) if point_labels is None else np.asarray(point_labels, np.int64)
            fields["point_coords"], fields["point_labels"] = coords, labels.reshape(1, -1)
        return cls(**fields)

    @classmethod
    def from_batch(cls, batch: dict) -> Prompts:
        """Read the prompt keys of a batch dict (missing keys are ``None``); other keys are ignored."""
        return cls(**{key: batch.get(key) for key in PROMPT_KEYS})

    def with_prev_mask(self, prev_mask: torch.Tensor | None) -> Prompts:
        """The same prompts with another previous prediction, e.g. between two interactive rounds."""
        return replace(self, prev_mask=prev_mask)


def _move(value: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if value is None else value.to(device)


def pad_points(
    coords: Sequence[torch.Tensor | np.ndarray | Sequence[Sequence[float]]],
    labels: Sequence[torch.Tensor | np.ndarray | Sequence[int]],
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged per-item clicks into ``[B, N, D]`` coordinates and ``[B, N]`` labels, padding with label ``-1``.

    Padded points get coordinate 0 and label -1, which every model ignores (VISTA3D's convention).

    Args:
        coords: per item, an ``(n_b, D)`` array of voxel indices (``n_b`` may be 0).
        labels: per item, ``(n_b,)`` labels in ``{0, 1}`` (or ``-1``).
        length: pad to this N (default: the longest item); shorter than an item is an error.

    Returns:
        ``(point_coords, point_labels)`` as float32 and long tensors.
    """
    if len(coords) != len(labels):
        raise PromptError(f"pad_points got {len(coords)} coordinate lists but {len(labels)} label lists.")
    if not coords:
        raise PromptError("pad_points needs at least one item.")
    arrays = [np.asarray(c, dtype=np.float32) for c in coords]
    dims = {a.shape[-1] for a in arrays if a.size}
    if len(dims) > 1 or any(a.size and a.ndim != 2 for a in arrays):
        raise PromptError(f"pad_points needs (n, D) point arrays of one D, got shapes {[a.shape for a in arrays]}.")
    dim = dims.pop() if dims else 3
    items = [torch.from_numpy(a.reshape(-1, dim)) for a in arrays]
    label_items = [torch.as_tensor(np.asarray(lab, dtype=np.int64)).reshape(-1) for lab in labels]
    for index, (item, lab) in enumerate(zip(items, label_items)):
        if item.shape[0] != lab.shape[0]:
            raise PromptError(f"item {index}: {item.shape[0]} points but {lab.shape[0]} point labels.")
    longest = max(item.shape[0] for item in items)
    n = longest if length is None else int(length)
    if n < longest:
        raise PromptError(f"pad_points length={n} is shorter than an item with {longest} points.")
    out_coords = torch.zeros(len(items), n, dim, dtype=torch.float32)
    out_labels = torch.full((len(items), n), -1, dtype=torch.long)
    for index, (item, lab) in enumerate(zip(items, label_items)):
        if item.shape[0]:
            out_coords[index, : item.shape[0]] = item
            out_labels[index, : lab.shape[0]] = lab
    return out_coords, out_labels


def collate_prompts(items: Sequence[Prompts]) -> Prompts:
    """Concatenate prompt sets along the batch axis, padding point lists to the longest with label ``-1``.

    All items must carry the same fields (a box for all or for none, etc.), since a tensor cannot hold a missing box;
    draw one prompt type per batch (as :func:`medseg.prompts.simulate.sample_prompts` does) to keep that true.
    """
    if not items:
        raise PromptError("collate_prompts needs at least one Prompts.")
    present = [tuple(key for key in PROMPT_KEYS if getattr(item, key) is not None) for item in items]
    if len(set(present)) > 1:
        raise PromptError(
            f"collate_prompts needs the same fields in every item, got {sorted(set(present))}; give every item a box "
            f"(or none), points (or none), etc."
        )
    out: dict[str, torch.Tensor] = {}
    if items[0].point_coords is not None:
        longest = max(item.point_coords.shape[1] for item in items)
        coords, labels = [], []
        for item in items:
            pad = longest - item.point_coords.shape[1]
            coords.append(torch.nn.functional.pad(item.point_coords, (0, 0, 0, pad)))
            labels.append(torch.nn.functional.pad(item.point_labels, (0, pad), value=-1))
        out["point_coords"], out["point_labels"] = torch.cat(coords), torch.cat(labels)
    for key in ("box", "class_vector", "prev_mask"):
        if getattr(items[0], key) is not None:
            try:
                out[key] = torch.cat([getattr(item, key) for item in items])
            except RuntimeError as error:
                raise PromptError(f"collate_prompts cannot stack {key}: {error}") from None
    return Prompts(**out)
