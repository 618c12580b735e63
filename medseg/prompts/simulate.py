"""Clicks and boxes simulated from reference masks, for training promptable models and for interactive evaluation.

The click rules are those of SAM, SAM-Med2D, RITM and MONAI DeepEdit, measured in millimetres so that a thick-slice
volume does not pull clicks toward its thin axes:

- the first click goes to the interior point farthest from the object's boundary (the maximum of the Euclidean
  distance transform, :func:`scipy.ndimage.distance_transform_edt` with ``sampling=spacing``);
- each further click goes to the centre (the same maximum-distance point) of the largest error region, found as a
  connected component (:func:`scipy.ndimage.label`) of the false negatives (a positive click, label 1) or of the false
  positives (a negative click, label 0). A click therefore always lands on a voxel the prediction got wrong.

The volume's border counts as boundary (the masks are zero-padded before the distance transform), so an object cut by
the field of view is clicked inside the field of view, not on its edge. Ties go to the first voxel in C order, so the
simulation is deterministic. Masks may be numpy arrays or torch tensors, 2D or 3D; coordinates are array indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from medseg.prompts.contract import PromptError, Prompts, pad_points

__all__ = [
    "PROMPT_MIX",
    "ClickSimulator",
    "binary_mask",
    "box_from_mask",
    "interactive_loop",
    "sample_object",
    "sample_prompts",
    "voxel_spacing",
]

PROMPT_MIX = {"points": 0.4, "box": 0.3, "box+points": 0.3}
"""Default share of batches prompted by clicks only, a box only, or a box with clicks."""

Click = tuple[tuple[int, ...], int]


def binary_mask(mask: np.ndarray | torch.Tensor, name: str, batched: bool = False) -> np.ndarray:
    """Boolean host mask (or ``[B, *spatial]`` masks when ``batched``) by the reference's rule: floats above 0.5,
    other types non-zero. The click simulators only read it, so a boolean input is not copied."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.ndim not in ((3, 4) if batched else (2, 3)):
        what = "a batch of 2D or 3D masks [B, *spatial]" if batched else "a 2D or 3D mask (no batch or channel axis)"
        raise PromptError(f"{name} must be {what}, got shape {array.shape}.")
    return array > 0.5 if array.dtype.kind == "f" else array.astype(bool, copy=False)


def voxel_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """``spacing`` checked as ``ndim`` finite positive voxel sizes in mm (``None``: 1 mm), for every click simulator."""
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(math.isfinite(v) and v > 0 for v in values):
        raise PromptError(f"spacing must hold {ndim} positive voxel sizes in mm, got {spacing}.")
    return values


def _distance_inside(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it, the volume border counting as out."""
    padded = np.pad(mask, 1)
    distance = ndimage.distance_transform_edt(padded, sampling=spacing)
    return distance[tuple(slice(1, -1) for _ in range(mask.ndim))]


def _centre(mask: np.ndarray, spacing: tuple[float, ...], exclude: Sequence[Sequence[int]] = ()) -> tuple[int, ...]:
    """The voxel of ``mask`` farthest (mm) from its boundary, skipping ``exclude``; ``()`` if none is left."""
    distance = _distance_inside(mask, spacing)
    for coord in exclude:
        distance[tuple(int(c) for c in coord)] = 0.0
    flat = int(np.argmax(distance))
    if distance.flat[flat] <= 0:
        return ()
    return tuple(int(v) for v in np.unravel_index(flat, mask.shape))


class ClickSimulator:
    """Model-agnostic click simulation: the first click at the object's centre, then one per largest error region.

    Args:
        spacing: voxel size in mm along each array axis (default isotropic 1 mm), for the distance transform.
        connectivity: neighbourhood of the error components: 1 = faces only, ``ndim`` = faces, edges and corners.
        avoid_repeats: never click a voxel twice: when the model ignored a click, the next one goes to the next-best
            voxel of the same region (or the next region), so that a stuck model does not see the same click forever.
    """

    def __init__(self, spacing: Sequence[float] | None = None, connectivity: int = 1, avoid_repeats: bool = True):
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.connectivity = int(connectivity)
        self.avoid_repeats = avoid_repeats

    def first_click(self, gt: np.ndarray | torch.Tensor) -> Click:
        """The positive click at the interior point of ``gt`` farthest (mm) from its boundary.

        Raises:
            PromptError: ``gt`` is empty (there is nothing to click on).
        """
        target = binary_mask(gt, "gt")
        if not target.any():
            raise PromptError("cannot click on an empty object; sample objects with sample_object (present classes).")
        return _centre(target, voxel_spacing(self.spacing, target.ndim)), 1

    def next_click(
        self,
        gt: np.ndarray | torch.Tensor,
        pred: np.ndarray | torch.Tensor | None,
        previous_clicks: Sequence[Click] | None = None,
    ) -> Click | None:
        """The click that corrects the largest error of ``pred``; :meth:`first_click` when ``pred`` is ``None``.

        Args:
            gt: reference mask (bool, integer, or float thresholded at 0.5).
            pred: current predicted mask (same rules), same shape.
            previous_clicks: ``(coord, label)`` clicks already given (skipped when ``avoid_repeats``).

        Returns:
            ``(coord, label)``: array indices of a voxel that ``pred`` gets wrong and 1 for a missed (false negative)
            region or 0 for a false positive one; ``None`` when ``pred`` is already perfect.
        """
        if pred is None:
            return self.first_click(gt)
        target, current = binary_mask(gt, "gt"), binary_mask(pred, "pred")
        if target.shape != current.shape:
            raise PromptError(f"gt {target.shape} and pred {current.shape} must have the same shape.")
        spacing = voxel_spacing(self.spacing, target.ndim)
        exclude = [coord for coord, _ in previous_clicks or ()] if self.avoid_repeats else []
        structure = ndimage.generate_binary_structure(target.ndim, self.connectivity)
        regions = []
        for error, label in ((target & ~current, 1), (current & ~target, 0)):
            components, count = ndimage.label(error, structure=structure)
            if count:
                sizes = np.bincount(components.ravel())[1:]
                regions += [(int(size), label, components, index + 1) for index, size in enumerate(sizes)]
        # largest first; at equal size a missed region (positive click) before a false positive, then label order
        for _, label, components, index in sorted(regions, key=lambda r: (-r[0], -r[1], r[3])):
            coord = _centre(components == index, spacing, exclude)
            if coord:
                return coord, label
        return None


def _as_probability(output: object, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(output, torch.Tensor):
        output = output.detach().float().cpu().numpy()
    array = np.asarray(output, dtype=np.float32)
    if array.size != int(np.prod(shape)):
        raise PromptError(f"predict_fn returned shape {array.shape}; it must return the mask's shape {shape}.")
    return array.reshape(shape)


def interactive_loop(
    predict_fn: Callable[[Prompts, torch.Tensor | None], object],
    gt: np.ndarray | torch.Tensor,
    num_clicks: int,
    box: Sequence[float] | np.ndarray | None = None,
    simulator: ClickSimulator | None = None,
    threshold: float = 0.5,
    clicks_out: list[Click] | None = None,
) -> list[np.ndarray]:
    """Simulate ``num_clicks`` rounds of interactive correction of one object.

    Round ``k`` sends every click so far (and the box, if any) as a batch-of-one :class:`Prompts` whose
    ``prev_mask`` is the previous round's output, calls ``predict_fn(prompts, prev_mask)`` and thresholds what it
    returns. With a box, the first call is made with the box alone, and the clicks correct that prediction.

    Args:
        predict_fn: returns probabilities or a binary mask of ``gt``'s shape (extra leading size-1 axes are fine).
            ``prev_mask`` is ``[1, 1, *spatial]`` float (``None`` in the first round).
        gt: reference mask of the object, 2D or 3D; clicks are its array indices.
        num_clicks: rounds to run.
        box: optional inclusive voxel box ``(lo..., hi...)``, e.g. from :func:`box_from_mask`.
        simulator: the click rules (default: isotropic 1 mm :class:`ClickSimulator`).
        threshold: foreground where the output exceeds it.
        clicks_out: if given, the clicks are appended to it as ``(coord, label)``.

    Returns:
        ``num_clicks`` boolean masks; entry ``k - 1`` is the prediction after ``k`` clicks. When a prediction is
        already perfect there is no error left to click, and it is repeated for the remaining rounds.
    """
    simulator = simulator or ClickSimulator()
    target = binary_mask(gt, "gt")
    box_tensor = None if box is None else torch.as_tensor(np.asarray(box, dtype=np.float32)).reshape(1, -1)
    clicks: list[Click] = []
    prev: torch.Tensor | None = None
    pred: np.ndarray | None = None
    if box_tensor is not None:
        prev = torch.from_numpy(_as_probability(predict_fn(Prompts(box=box_tensor), None), target.shape))[None, None]
        pred = prev[0, 0].numpy() > threshold
    masks: list[np.ndarray] = []
    for _ in range(num_clicks):
        click = simulator.next_click(target, pred, clicks)
        if click is None:
            masks.append(pred.copy())
            continue
        clicks.append(click)
        if clicks_out is not None:
            clicks_out.append(click)
        coords, labels = pad_points([[c for c, _ in clicks]], [[lab for _, lab in clicks]])
        prompts = Prompts(point_coords=coords, point_labels=labels, box=box_tensor, prev_mask=prev)
        probability = _as_probability(predict_fn(prompts, prev), target.shape)
        prev = torch.from_numpy(probability)[None, None]
        pred = probability > threshold
        masks.append(pred.copy())
    return masks


def _extent(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of the True voxels of a non-empty ``mask`` along each axis, from its projections (a pass
    per axis, cheaper than listing the voxels)."""
    axes = range(mask.ndim)
    occupied = [np.flatnonzero(mask.any(axis=tuple(a for a in axes if a != axis))) for axis in axes]
    return np.array([int(o[0]) for o in occupied]), np.array([int(o[-1]) for o in occupied])


def box_from_mask(
    mask: np.ndarray | torch.Tensor,
    jitter_voxels: int = 0,
    jitter_fraction: float = 0.0,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """The tight inclusive bounding box of ``mask``, each edge shifted independently by a random jitter.

    Each of the ``2D`` edges moves by an integer drawn uniformly from ``[-m, m]`` voxels, where
    ``m = max(jitter_voxels, round(jitter_fraction * side))`` and ``side`` is the box's extent (voxels) along that
    edge's axis, as SAM's box augmentation does. The result is clipped to the array and keeps ``hi >= lo``.

    Returns:
        ``(2D,)`` int64 array ``(i0, j0[, k0], i1, j1[, k1])`` of inclusive voxel indices.

    Raises:
        PromptError: ``mask`` is empty or a jitter is negative.
    """
    target = binary_mask(mask, "mask")
    if not target.any():
        raise PromptError("box_from_mask got an empty mask; there is no object to put a box around.")
    if jitter_voxels < 0 or jitter_fraction < 0:
        raise PromptError(f"jitter must be >= 0, got {jitter_voxels} voxels and fraction {jitter_fraction}.")
    lo, hi = _extent(target)
    side = hi - lo + 1
    margin = np.maximum(int(jitter_voxels), np.rint(float(jitter_fraction) * side).astype(int))
    if margin.any():
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        lo = lo + generator.integers(-margin, margin + 1)
        hi = hi + generator.integers(-margin, margin + 1)
    upper = np.asarray(target.shape) - 1
    lo, hi = np.clip(lo, 0, upper), np.clip(hi, 0, upper)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return np.concatenate([lo, hi]).astype(np.int64)


def _present(array: np.ndarray) -> list[int]:
    """The non-zero values of a label map, ascending, as ints (``np.unique``'s order). Label maps hold a few small
    integers (often stored as floats): then a byte copy and one comparison per value is several times faster than
    ``np.unique``'s sort; anything else goes through ``np.unique``."""
    flat = array.ravel()
    if flat.size and flat.dtype.kind in "fiu":
        low, high = flat.min(), flat.max()
        if low >= 0 and high < 256:
            values = flat.astype(np.uint8)
            if flat.dtype.kind != "f" or np.array_equal(values, flat):
                return [v for v in range(1, int(high) + 1) if (values == v).any()]
    return [int(v) for v in np.unique(array) if v != 0]


def sample_object(
    label: np.ndarray | torch.Tensor,
    rng: np.random.Generator,
    mode: str = "class",
    classes: Sequence[int] | None = None,
    connectivity: int = 1,
) -> tuple[np.ndarray, int]:
    """One object to prompt for in a (multi-class) label map: a present class, or one connected component of it.

    Args:
        label: integer label map (2D or 3D, no channel axis); 0 is background.
        rng: the random generator (seeded by the caller).
        mode: ``"class"`` for all voxels of the class, ``"component"`` for one connected component of it.
        classes: the class ids eligible (default: every non-zero value present).
        connectivity: neighbourhood of the components (``"component"`` mode).

    Returns:
        ``(mask, class_id)``: the boolean target and its class; an all-False mask and class 0 when no eligible class
        is present (an empty-object sample, which trains the model to answer "nothing here").
    """
    if mode not in ("class", "component"):
        raise PromptError(f"object mode must be 'class' or 'component', got {mode!r}.")
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    array = np.asarray(label)
    present = _present(array)
    if classes is not None:
        present = [v for v in present if v in {int(c) for c in classes}]
    if not present:
        return np.zeros(array.shape, dtype=bool), 0
    class_id = int(rng.choice(present))
    mask = array == class_id
    if mode == "component":
        components, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, connectivity))
        mask = components == int(rng.integers(1, count + 1))
    return mask, class_id


def _random_voxels(
    mask: np.ndarray, count: int, rng: np.random.Generator, lo: Sequence[int] | None = None
) -> np.ndarray:
    """``count`` distinct voxels of ``mask`` at random (all if fewer), offset by ``lo`` when ``mask`` is a box of a
    larger array (its voxels in C order are those of the array's within the box, so the draw is the same)."""
    candidates = np.argwhere(mask)
    if count <= 0 or not len(candidates):
        return np.zeros((0, mask.ndim), dtype=np.int64)
    chosen = candidates[rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)]
    return chosen if lo is None else chosen + np.asarray(lo)


def _points_for(target: np.ndarray, rng: np.random.Generator, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """1..max_points clicks: the first positive, the others positive or negative with equal chance.

    Positives are drawn inside the object's box, negatives inside the box grown by a quarter of its side (at least 2
    voxels) when it holds background (informative negatives near the object), else anywhere in the background.
    """
    n = int(rng.integers(1, max_points + 1))
    n_pos = 1 + int(rng.binomial(n - 1, 0.5))
    lo, hi = _extent(target)
    positive = _random_voxels(target[tuple(slice(a, b + 1) for a, b in zip(lo, hi))], n_pos, rng, lo)
    grow = np.maximum(2, (hi - lo) // 4)
    near_lo, near_hi = np.maximum(lo - grow, 0), hi + grow + 1
    near = ~target[tuple(slice(a, b) for a, b in zip(near_lo, near_hi))]
    if near.any():
        negative = _random_voxels(near, n - len(positive), rng, near_lo)
    else:
        negative = _random_voxels(~target, n - len(positive), rng)
    coords = np.concatenate([positive, negative])
    labels = np.array([1] * len(positive) + [0] * len(negative), dtype=np.int64)
    return coords, labels


def sample_prompts(
    label_batch: np.ndarray | torch.Tensor,
    rng: np.random.Generator,
    mix: Mapping[str, float] | None = None,
    max_points: int = 5,
    object_mode: str = "class",
    classes: Sequence[int] | None = None,
    jitter_fraction: float = 0.1,
    jitter_voxels: int = 0,
) -> tuple[Prompts, torch.Tensor]:
    """Training prompts for a batch: one object per item, prompted by points, a box, or both.

    One prompt type is drawn per batch from ``mix`` (so every item carries the same tensors and the batch collates);
    over many batches the types follow ``mix``. Each item's object comes from :func:`sample_object`; points are drawn
    at random inside the object (positives, the first always positive) and in the background around it (negatives);
    boxes are jittered tight boxes (:func:`box_from_mask`). An item with no eligible class gets an empty target and a
    single negative click (or a box on the whole image in box-only batches), so the batch still collates.

    Args:
        label_batch: ``[B, 1, *spatial]`` integer label maps (2D or 3D).
        rng: the random generator (seeded by the caller, e.g. per worker).
        mix: relative weights of ``"points"``, ``"box"`` and ``"box+points"`` (default :data:`PROMPT_MIX`).
        max_points: at most this many clicks per item (padded with label -1 to the batch's longest).
        object_mode: ``"class"`` or ``"component"`` (see :func:`sample_object`).
        classes: eligible class ids (default: all present).
        jitter_fraction: box edge jitter as a fraction of the box side.
        jitter_voxels: box edge jitter in voxels (the larger of the two applies).

    Returns:
        ``(prompts, target)``: :class:`Prompts` with ``class_vector [B, 1]`` holding each item's class id, and the
        ``[B, 1, *spatial]`` float32 binary target on the labels' device.
    """
    weights = dict(PROMPT_MIX if mix is None else mix)
    unknown = set(weights) - set(PROMPT_MIX)
    if unknown or not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise PromptError(f"mix needs non-negative weights for {sorted(PROMPT_MIX)} with a positive sum, got {mix}.")
    if max_points < 1:
        raise PromptError(f"max_points must be at least 1, got {max_points}.")
    device = label_batch.device if isinstance(label_batch, torch.Tensor) else torch.device("cpu")
    labels = label_batch.detach().cpu().numpy() if isinstance(label_batch, torch.Tensor) else np.asarray(label_batch)
    if labels.ndim not in (4, 5) or labels.shape[1] != 1:
        raise PromptError(f"label_batch must be [B, 1, *spatial] (2D or 3D), got shape {labels.shape}.")
    names = sorted(weights)
    probabilities = np.array([weights[n] for n in names], dtype=np.float64)
    kind = names[int(rng.choice(len(names), p=probabilities / probabilities.sum()))]
    targets, class_ids, boxes, point_coords, point_labels = [], [], [], [], []
    for item in labels[:, 0]:
        target, class_id = sample_object(item, rng, object_mode, classes)
        targets.append(target)
        class_ids.append(class_id)
        if "box" in kind:
            if target.any():
                boxes.append(box_from_mask(target, jitter_voxels, jitter_fraction, rng))
            else:
                boxes.append(np.concatenate([np.zeros(item.ndim, int), np.asarray(item.shape) - 1]))
        if kind != "box":
            if target.any():
                coords, point_label = _points_for(target, rng, max_points)
            else:
                coords, point_label = _random_voxels(np.ones_like(target), 1, rng), np.zeros(1, dtype=np.int64)
            point_coords.append(coords)
            point_labels.append(point_label)
    fields: dict[str, torch.Tensor] = {"class_vector": torch.tensor(class_ids, dtype=torch.long)[:, None]}
    if boxes:
        fields["box"] = torch.as_tensor(np.stack(boxes), dtype=torch.float32)
    if point_coords:
        fields["point_coords"], fields["point_labels"] = pad_points(point_coords, point_labels)
    target = torch.from_numpy(np.stack(targets)[:, None].astype(np.float32))
    return Prompts(**fields).to(device), target.to(device)
