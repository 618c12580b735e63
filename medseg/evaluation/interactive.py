"""Interactive evaluation of promptable models: Dice@k, NoC@85/90, box Dice and propagation Dice, per object.

The protocol is the one of the interactive segmentation literature (RITM, SAM, SAM-Med2D, SAM-Med3D), with clicks
simulated by :class:`medseg.prompts.ClickSimulator` (first click at the object's centre, then one per largest error
region, distances in mm):

- **Dice@k** (k = 1..``dice_k``): Dice after k clicks, each round refining the previous prediction.
- **NoC@85 / NoC@90**: the number of clicks needed to reach Dice 0.85 / 0.90, capped at ``max_clicks`` (20); an
  object never reaching it counts as ``max_clicks``, as in the literature, so the mean stays finite.
- **box Dice**: Dice of the prediction from the object's tight box alone.
- **propagation Dice**: Dice of a 3D mask propagated from one 2D box on the object's middle slice.

The model is a ``predict_fn(prompts, prev_mask)`` closure over one case's image (see
:func:`medseg.prompts.interactive_loop`), so any promptable model, 2D or 3D, can be scored. An object is a
foreground class of the reference, or one connected component of it (``mode="component"``); classes absent from the
reference have nothing to click on and are not scored. Dice follows :mod:`medseg.evaluation.metrics` (MONAI,
``ignore_empty=False``). :func:`summarize_interactive` gives the ``interactive`` section of ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from scipy import ndimage

from medseg.evaluation.metrics import EvaluationError, foreground_classes
from medseg.prompts.contract import Prompts
from medseg.prompts.simulate import ClickSimulator, box_from_mask, interactive_loop

__all__ = [
    "DICE_K",
    "MAX_CLICKS",
    "NOC_THRESHOLDS",
    "dice",
    "evaluate_case_interactive",
    "evaluate_object",
    "interactive_objects",
    "middle_slice_box",
    "noc",
    "propagation_dice",
    "summarize_interactive",
]

DICE_K = 10
MAX_CLICKS = 20
NOC_THRESHOLDS = {"noc85": 0.85, "noc90": 0.90}

PredictFn = Callable[[Prompts, "torch.Tensor | None"], object]


def _array(mask: object) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    return array > 0.5 if array.dtype.kind == "f" else array.astype(bool)


def dice(prediction: object, reference: object) -> float:
    """Dice of two binary masks by MONAI; 1.0 when both are empty, 0.0 when exactly one is (the metrics policy)."""
    pred, ref = _array(prediction), _array(reference)
    if pred.shape != ref.shape:
        raise EvaluationError(f"prediction {pred.shape} and reference {ref.shape} must have the same shape.")
    value = compute_dice(
        torch.from_numpy(pred)[None, None].float(),
        torch.from_numpy(ref)[None, None].float(),
        include_background=True,
        ignore_empty=False,
    )
    return float(value.item())


def noc(dices: Sequence[float], threshold: float, max_clicks: int = MAX_CLICKS) -> int:
    """Clicks to reach ``threshold``: the first k (1-based) with ``dices[k - 1] >= threshold``, else ``max_clicks``."""
    for k, value in enumerate(dices[:max_clicks], start=1):
        if value >= threshold:
            return k
    return max_clicks


def propagation_dice(volume: object, reference: object) -> float:
    """Dice of a propagated 3D mask (e.g. from :mod:`medseg.inference.propagate`) against the object's reference."""
    if np.ndim(volume) != 3:
        raise EvaluationError(f"a propagated prediction must be a 3D mask, got shape {np.shape(volume)}.")
    return dice(volume, reference)


def middle_slice_box(mask: object, axis: int = 2) -> np.ndarray:
    """The 2D box that starts slice propagation: the tight box of the object on its middle slice along ``axis``.

    Returns:
        ``(6,)`` int64 inclusive voxel box in the prompts-file convention, flat along ``axis`` (``k0 == k1`` for
        ``axis=2``).
    """
    target = _array(mask)
    if target.ndim != 3 or not target.any():
        raise EvaluationError(f"middle_slice_box needs a non-empty 3D mask, got shape {target.shape}.")
    slices = np.flatnonzero(target.any(axis=tuple(a for a in range(3) if a != axis)))
    middle = int(slices[(len(slices) - 1) // 2])  # the lower of two middles for an even count
    plane = box_from_mask(np.take(target, middle, axis=axis))
    lo, hi = list(plane[:2]), list(plane[2:])
    lo.insert(axis, middle)
    hi.insert(axis, middle)
    return np.asarray(lo + hi, dtype=np.int64)


def evaluate_object(
    predict_fn: PredictFn,
    reference: object,
    spacing_mm: Sequence[float] | None = None,
    max_clicks: int = MAX_CLICKS,
    dice_k: int = DICE_K,
    box: bool = True,
    box_jitter_fraction: float = 0.0,
    seed: int = 0,
    propagate_fn: Callable[[np.ndarray], object] | None = None,
    slice_axis: int = 2,
) -> dict[str, object]:
    """Interactive metrics of one object (see the module docstring).

    Args:
        predict_fn: ``predict_fn(prompts, prev_mask) -> probabilities or mask`` of the reference's shape.
        reference: the object's binary mask (2D or 3D) on the grid the prompts refer to.
        spacing_mm: voxel size for the click distances (default isotropic).
        max_clicks: clicks simulated (and the NoC cap).
        dice_k: how many Dice@k values to report (k = 1..dice_k).
        box: also score the box prompt alone.
        box_jitter_fraction: jitter of that box (fraction of its side; 0 = the tight box).
        seed: seeds the box jitter.
        propagate_fn: if given, ``propagate_fn(box6) -> 3D mask`` from :func:`middle_slice_box`; its Dice is scored.
        slice_axis: the axis propagation runs along.

    Returns:
        ``{"dice_at_k": [dice_k floats], "noc85": int, "noc90": int, "box_dice": float, "propagation_dice": float,
        "clicks": int}`` (box and propagation keys only when scored; ``clicks`` = clicks actually simulated).
    """
    if dice_k > max_clicks:
        raise EvaluationError(f"dice_k ({dice_k}) cannot exceed max_clicks ({max_clicks}).")
    target = _array(reference)
    clicks: list = []
    masks = interactive_loop(predict_fn, target, max_clicks, simulator=ClickSimulator(spacing_mm), clicks_out=clicks)
    dices = [dice(mask, target) for mask in masks]
    result: dict[str, object] = {"dice_at_k": dices[:dice_k]}
    result.update({name: noc(dices, threshold, max_clicks) for name, threshold in NOC_THRESHOLDS.items()})
    result["clicks"] = len(clicks)
    if box:
        prompt = box_from_mask(target, jitter_fraction=box_jitter_fraction, rng=seed)
        output = predict_fn(Prompts(box=prompt[None].astype(np.float32)), None)
        result["box_dice"] = dice(np.asarray(_array(output)).reshape(target.shape), target)
    if propagate_fn is not None:
        result["propagation_dice"] = propagation_dice(propagate_fn(middle_slice_box(target, slice_axis)), target)
    return result


def interactive_objects(
    reference: object, labels: Mapping[str, int | Sequence[int]], mode: str = "class", connectivity: int = 1
) -> list[dict[str, object]]:
    """The objects of a reference label map: each present foreground class, or each connected component of it.

    Returns:
        ``[{"class": name, "component": index or None, "mask": bool array}]``, components numbered from 1 in
        :func:`scipy.ndimage.label` order.
    """
    if mode not in ("class", "component"):
        raise EvaluationError(f"interactive object mode must be 'class' or 'component', got {mode!r}.")
    array = reference.detach().cpu().numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference)
    objects = []
    for name, values in foreground_classes(labels).items():
        mask = np.isin(array, values)
        if not mask.any():
            continue
        if mode == "class":
            objects.append({"class": name, "component": None, "mask": mask})
            continue
        structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
        components, count = ndimage.label(mask, structure=structure)
        objects += [{"class": name, "component": c, "mask": components == c} for c in range(1, count + 1)]
    return objects


def evaluate_case_interactive(
    predict_fn: PredictFn,
    reference: object,
    labels: Mapping[str, int | Sequence[int]],
    spacing_mm: Sequence[float] | None = None,
    mode: str = "class",
    propagate_fn: Callable[[np.ndarray], object] | None = None,
    **kwargs: object,
) -> list[dict[str, object]]:
    """Interactive metrics of every object of one case (the per-case entry of the ``interactive`` section).

    Args:
        predict_fn: closure over this case's image; called per object (see :func:`evaluate_object`).
        reference: the case's integer label map on the grid the prompts refer to.
        labels: ``{class_name: value}`` as in ``dataset.json``.
        spacing_mm: voxel size (mm) of that grid.
        mode: ``"class"`` or ``"component"`` objects.
        propagate_fn: see :func:`evaluate_object`.
        **kwargs: passed to :func:`evaluate_object` (``max_clicks``, ``dice_k``, ``box``, ...).

    Returns:
        One dict per object: ``{"class", "component", "n_voxels", **evaluate_object(...)}``.
    """
    results = []
    for obj in interactive_objects(reference, labels, mode):
        scores = evaluate_object(predict_fn, obj["mask"], spacing_mm, propagate_fn=propagate_fn, **kwargs)
        results.append({"class": obj["class"], "component": obj["component"], "n_voxels": int(obj["mask"].sum())})
        results[-1].update(scores)
    return results


def _means(objects: Sequence[Mapping[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {"n_objects": len(objects)}
    if not objects:
        return out
    out["dice_at_k"] = [float(v) for v in np.mean([o["dice_at_k"] for o in objects], axis=0)]
    for key in (*NOC_THRESHOLDS, "box_dice", "propagation_dice"):
        values = [float(o[key]) for o in objects if o.get(key) is not None]
        if values:
            out[key] = float(np.mean(values))
    return out


def summarize_interactive(
    cases: Mapping[str, Sequence[Mapping[str, object]]], max_clicks: int = MAX_CLICKS
) -> dict[str, object]:
    """The ``interactive`` section of ``summary.json``: per case, per class means, and the mean over classes.

    Args:
        cases: ``{case_id: evaluate_case_interactive(...)}``.
        max_clicks: the NoC cap used, recorded with the results.

    Returns:
        ``{"protocol", "max_clicks", "per_case": {case: {"objects", "mean"}}, "per_class": {name: means}, "mean":
        means over all objects, "foreground_mean": mean of the per-class means}``; every mean holds ``dice_at_k``
        (list), ``noc85``, ``noc90``, and ``box_dice`` / ``propagation_dice`` where scored.
    """
    everything = [obj for objects in cases.values() for obj in objects]
    names = sorted({str(obj["class"]) for obj in everything})
    per_class = {name: _means([o for o in everything if o["class"] == name]) for name in names}
    class_means = [m for m in per_class.values() if m["n_objects"]]
    foreground: dict[str, object] = {"n_classes": len(class_means)}
    if class_means:
        foreground["dice_at_k"] = [float(v) for v in np.mean([m["dice_at_k"] for m in class_means], axis=0)]
        for key in (*NOC_THRESHOLDS, "box_dice", "propagation_dice"):
            values = [m[key] for m in class_means if key in m]
            if values:
                foreground[key] = float(np.mean(values))
    protocol = (
        f"Clicks simulated at the centre (max EDT, mm) of the object, then of the largest error region; Dice after k "
        f"clicks; NoC = clicks to reach Dice 0.85/0.90, {max_clicks} when never reached; box Dice from the tight box; "
        f"propagation Dice from one 2D box on the middle slice."
    )
    return {
        "protocol": protocol,
        "max_clicks": max_clicks,
        "per_case": {
            case: {"objects": [dict(o) for o in objects], "mean": _means(objects)} for case, objects in cases.items()
        },
        "per_class": per_class,
        "mean": _means(everything),
        "foreground_mean": foreground,
    }
