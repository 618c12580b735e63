"""The CVPR 2025 interactive protocol (challenge "Foundation Models for Interactive 3D Biomedical Image Segmentation",
SegFM3D): one box, then five clicks, six predictions per case; DSC_AUC, NSD_AUC, final DSC and NSD, time per step.

The rules are those of the challenge's evaluation (``CVPR25_iter_eval.py``) and box maker (``get_boxes.py``), so
that medseg's numbers compare with the challenge's:

- **Classes.** Every foreground class present in the reference is prompted at every step, and one label map holds
  them all (the challenge runs the model once per step for all classes). medseg's models answer one object at a
  time, so each class's mask is painted into the map in class order (a later class wins a disputed voxel).
- **Step 1, the box** (:func:`challenge_box`): per class, its slice range along the slice axis (``z_min..z_max``,
  closed) and its tight 2-D box on ``z_mid``, the slice of its median voxel counted slice by slice, each side widened
  by a random 0-``max_shift`` pixels scaled by the side's length / 256 (0 on images under 52 pixels). A case run
  without a box skips the step, which scores DSC 0, NSD 0 and 0 s, as in the challenge.
- **Steps 2-6, the clicks** (:func:`challenge_click`): per class, the voxels where the last label map and the
  reference disagree about the class, their largest 26-connected component, and the voxel of that component farthest
  from its boundary by Euclidean distance transform in voxel units (the volume border counts as outside, as the
  challenge's padded crop does; ties drawn as its ``sample_coord`` does, with seed 42). The click is positive where
  the class was missed (under-segmentation) and negative where it was over-segmented. A class without error gets no
  click and keeps its mask. These are not :class:`medseg.prompts.ClickSimulator`'s rules (mm, false negatives and
  positives as separate regions, faces-only connectivity): the challenge's are kept here on purpose.
- **Scores per step.** DSC per class, averaged over the classes; NSD at 2 mm per class with surface-element areas
  (MONAI's ``compute_surface_dice(use_subvoxels=True)``, the DeepMind definition the challenge uses), averaged, and
  computed only when that step's mean DSC exceeds 0.2 (0 otherwise, the challenge's shortcut).
- **AUC** (:func:`auc`): the trapezoid rule over the click steps only (the last five scores, one unit per step), not
  normalised, so DSC_AUC and NSD_AUC lie in [0, 4]; the challenge leaves the box step out because boxes are optional.
  Final DSC and NSD are those of step 6.
- **Time.** The model's seconds per step for all classes (click simulation and scoring excluded), their total, and
  their mean over the steps run. Optional per-class limit (the challenge's final phase: 90 s per class): a step that
  ends past ``limit x classes`` fails, its output is discarded (a container stopped at the limit leaves none) and no
  later step runs; those steps score an empty label map.

A model takes part through an :class:`ObjectSession` per class (:mod:`medseg.evaluation.segfm3d_run` has those of
medseg's models); :func:`run_case` runs the protocol on one case and :func:`summarize_segfm3d` gives the
``protocol`` section of ``summary.json``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from scipy import integrate, ndimage

from medseg.errors import ConfigError
from medseg.evaluation.interactive import dice
from medseg.evaluation.metrics import EvaluationError

__all__ = [
    "PROTOCOL",
    "ChallengeBox",
    "ObjectSession",
    "Segfm3dSettings",
    "auc",
    "challenge_box",
    "challenge_click",
    "protocol_per_case",
    "run_case",
    "step_scores",
    "summarize_segfm3d",
    "surface_dice",
]

PROTOCOL = "segfm3d"
Click = tuple[tuple[int, ...], int]


@dataclass(frozen=True)
class Segfm3dSettings:
    """The protocol's options (``task.evaluation.segfm3d``); the defaults are the challenge's.

    Attributes:
        box: start with the box step (the challenge gives a box where the case has one).
        box_shift: the box sides' random widening at 256 pixels (get_boxes.py: 0-5); 0 = the tight box.
        clicks: click steps after the box (5).
        nsd_tolerance_mm: NSD tolerance (2 mm).
        nsd_min_dsc: NSD is computed only above this mean DSC (0.2), else 0.
        time_limit_per_class_s: model seconds per class and case (the challenge's final phase: 90); ``None``: none.
    """

    box: bool = True
    box_shift: int = 5
    clicks: int = 5
    nsd_tolerance_mm: float = 2.0
    nsd_min_dsc: float = 0.2
    time_limit_per_class_s: float | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> Segfm3dSettings:
        """Settings from ``task.evaluation.segfm3d``; an unknown key or impossible value is a :class:`ConfigError`."""
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(
                f"task.evaluation.segfm3d has unknown keys {unknown}; known: {sorted(f.name for f in fields(cls))}."
            )
        settings = cls(**values)
        if settings.clicks < 1 or settings.box_shift < 0 or settings.nsd_tolerance_mm <= 0:
            raise ConfigError(
                f"task.evaluation.segfm3d needs clicks >= 1, box_shift >= 0 and nsd_tolerance_mm > 0; got {values}."
            )
        if settings.time_limit_per_class_s is not None and settings.time_limit_per_class_s <= 0:
            raise ConfigError("task.evaluation.segfm3d.time_limit_per_class_s must be positive seconds, or null.")
        return settings


@dataclass(frozen=True)
class ChallengeBox:
    """The challenge's box of one class: slice range ``lo[axis]..hi[axis]`` and the in-plane box of slice ``mid``.

    Attributes:
        lo, hi: inclusive voxel corners (RAS grid of the case).
        mid: the slice (along ``axis``) that the in-plane box was taken on.
        axis: the slice axis.
    """

    lo: tuple[int, ...]
    hi: tuple[int, ...]
    mid: int
    axis: int

    def box6(self) -> np.ndarray:
        """``(i0, j0, k0, i1, j1, k1)`` float32, the prompts-file convention."""
        return np.asarray([*self.lo, *self.hi], dtype=np.float32)


class ObjectSession(Protocol):
    """One class of one case as a model sees the protocol; it keeps its own state (previous logits, memory).

    Both methods return the class's whole ``(X, Y, Z)`` boolean mask on the case's grid.
    """

    def box(self, box: ChallengeBox) -> np.ndarray:
        """The prediction from the challenge's box alone (step 1)."""

    def click(self, clicks: Sequence[Click]) -> np.ndarray:
        """The prediction after a new click: every click so far, the newest last, as ``((i, j, k), label)``."""


def challenge_box(
    mask: np.ndarray, axis: int = 2, max_shift: int = 5, rng: np.random.Generator | int | None = 0
) -> ChallengeBox:
    """The challenge's box of a non-empty 3-D mask (see the module docstring)."""
    target = np.asarray(mask, dtype=bool)
    if target.ndim != 3 or not target.any():
        raise EvaluationError(f"challenge_box needs a non-empty 3-D mask, got shape {target.shape}.")
    counts = target.sum(axis=tuple(a for a in range(3) if a != axis))
    slices = np.flatnonzero(counts)
    mid = int(np.searchsorted(np.cumsum(counts), int(counts.sum()) // 2, side="right"))  # the median voxel's slice
    plane = np.take(target, mid, axis=axis)
    shift = 0
    if max_shift > 0:
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        shift = int(generator.integers(0, max_shift + 1))
    lo, hi = [], []
    for dim, occupied in enumerate(np.nonzero(plane)):
        size = plane.shape[dim]
        widen = int(shift * size / 256)
        lo.append(max(0, int(occupied.min()) - widen))
        hi.append(min(size - 1, int(occupied.max()) + widen))
    lo.insert(axis, int(slices[0]))
    hi.insert(axis, int(slices[-1]))
    return ChallengeBox(tuple(lo), tuple(hi), mid, axis)


def challenge_click(reference: np.ndarray, prediction: np.ndarray) -> Click | None:
    """The challenge's correction click for one class: ``((i, j, k), 1)`` in a missed region, ``(..., 0)`` in an
    over-segmented one, at the centre of the largest error component; ``None`` when the prediction is exact."""
    target, current = np.asarray(reference, dtype=bool), np.asarray(prediction, dtype=bool)
    if target.shape != current.shape:
        raise EvaluationError(f"reference {target.shape} and prediction {current.shape} must have the same shape.")
    error = target != current
    if not error.any():
        return None
    components, _ = ndimage.label(error, structure=np.ones((3,) * error.ndim, dtype=bool))
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    region = components == int(np.argmax(sizes))
    occupied = np.nonzero(region)
    lo = np.array([int(o.min()) for o in occupied])
    hi = np.array([int(o.max()) + 1 for o in occupied])
    crop = np.pad(region[tuple(slice(a, b) for a, b in zip(lo, hi))], 1)  # the border counts as outside
    distance = ndimage.distance_transform_edt(crop)[(slice(1, -1),) * region.ndim]
    best = np.argwhere(distance == distance.max())
    chosen = best[np.random.RandomState(42).choice(len(best))]  # the challenge's sample_coord: seed 42, uniform
    centre = tuple(int(v) for v in chosen + lo)
    return centre, int(target[centre])


def surface_dice(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    """NSD of two binary masks at ``tolerance`` mm with surface-element areas (DeepMind's definition); 0 when the
    prediction is empty (no predicted surface can be near the reference's), 1 when both are."""
    ref, pred = np.asarray(reference, dtype=bool), np.asarray(prediction, dtype=bool)
    if not pred.any() or not ref.any():
        return float(pred.any() == ref.any())
    with warnings.catch_warnings():  # MONAI calls a deprecated argument of its own get_mask_edges
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(
            torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None], [float(tolerance)],
            include_background=True, spacing=[float(s) for s in spacing], use_subvoxels=True,
        )  # fmt: skip
    return float(value.item())


def step_scores(
    reference: np.ndarray,
    label_map: np.ndarray,
    classes: Mapping[str, int],
    spacing: Sequence[float],
    settings: Segfm3dSettings,
) -> dict[str, Any]:
    """One step's scores: ``{"dsc", "nsd", "per_class": {name: {"dsc", "nsd"}}}`` (per-class NSD ``None`` where the
    mean DSC left it uncomputed)."""
    per_class = {name: {"dsc": dice(label_map == v, reference == v), "nsd": None} for name, v in classes.items()}
    mean_dsc = float(np.mean([s["dsc"] for s in per_class.values()]))
    mean_nsd = 0.0
    if mean_dsc > settings.nsd_min_dsc:
        for name, value in classes.items():
            per_class[name]["nsd"] = surface_dice(
                reference == value, label_map == value, spacing, settings.nsd_tolerance_mm
            )
        mean_nsd = float(np.mean([s["nsd"] for s in per_class.values()]))
    return {"dsc": mean_dsc, "nsd": mean_nsd, "per_class": per_class}


def auc(values: Sequence[float], clicks: int = 5) -> float:
    """The challenge's AUC: trapezoid rule over the last ``clicks`` scores at unit spacing (range [0, clicks - 1])."""
    if len(values) < clicks:
        raise EvaluationError(f"AUC needs the {clicks} click steps' scores, got {len(values)}.")
    return float(integrate.trapezoid(np.asarray(values[-clicks:], dtype=np.float64), dx=1.0))


def _paint(masks: Mapping[str, np.ndarray], classes: Mapping[str, int], shape: tuple[int, ...]) -> np.ndarray:
    label_map = np.zeros(shape, dtype=np.int64)
    for name, value in classes.items():
        label_map[np.asarray(masks[name], dtype=bool).reshape(shape)] = value
    return label_map


def run_case(
    sessions: Mapping[str, ObjectSession],
    reference: np.ndarray,
    classes: Mapping[str, int],
    spacing: Sequence[float],
    settings: Segfm3dSettings,
    axis: int = 2,
    seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray]:
    """The protocol on one case (module docstring).

    Args:
        sessions: one :class:`ObjectSession` per class name of ``classes``.
        reference: ``(X, Y, Z)`` integer label map on the grid of the sessions' masks.
        classes: ``{name: label value}`` of the classes to prompt (present in ``reference``).
        spacing: voxel size (mm) of that grid, for NSD.
        axis: the slice axis of the boxes.
        seed: seeds the boxes' random widening.

    Returns:
        ``(result, label_map)``: the case's entry of the ``protocol`` section (``dsc``, ``nsd``, ``step_seconds``:
        one value per step; ``dsc_auc``, ``nsd_auc``, ``final_dsc``, ``final_nsd``, ``total_seconds``,
        ``seconds_per_step``, ``time_limit_s`` (the case's budget), ``failed_at_step`` (1-based step that ran past
        it, or ``None``), ``per_class``: each class's ``dsc`` and ``nsd`` curves, ``box`` (``lo + hi + [mid]``, or
        ``None`` without the box step) and ``clicks`` (``[i, j, k, label]``)) and the last step's label map.
    """
    reference = np.asarray(reference)
    if reference.ndim != 3:
        raise EvaluationError(f"the segfm3d protocol scores 3-D cases; got a reference of shape {reference.shape}.")
    targets = {name: reference == value for name, value in classes.items()}
    if not targets or not all(t.any() for t in targets.values()):
        raise EvaluationError(f"every class given to the protocol must be present in the reference, got {classes}.")
    rng = np.random.default_rng(seed)
    boxes = {name: challenge_box(t, axis, settings.box_shift, rng) for name, t in targets.items()}
    budget = None if settings.time_limit_per_class_s is None else settings.time_limit_per_class_s * len(classes)
    masks = {name: np.zeros(reference.shape, dtype=bool) for name in classes}
    clicks: dict[str, list[Click]] = {name: [] for name in classes}
    label_map = np.zeros(reference.shape, dtype=np.int64)
    steps, used, ran, failed = [], 0.0, 0, None
    for step in range(settings.clicks + 1):
        if (step == 0 and not settings.box) or failed is not None:
            steps.append({**step_scores(reference, label_map, classes, spacing, settings), "seconds": 0.0})
            continue
        new = {} if step == 0 else {n: challenge_click(targets[n], label_map == v) for n, v in classes.items()}
        for name, click in new.items():
            if click is not None:
                clicks[name].append(click)
        begin = time.perf_counter()
        for name in classes:
            if step == 0:
                masks[name] = sessions[name].box(boxes[name])
            elif new[name] is not None:
                masks[name] = sessions[name].click(list(clicks[name]))
        seconds = time.perf_counter() - begin
        used, ran = used + seconds, ran + 1
        if budget is not None and used > budget:
            failed = step + 1
            masks = {name: np.zeros(reference.shape, dtype=bool) for name in classes}
        label_map = _paint(masks, classes, reference.shape)
        steps.append({**step_scores(reference, label_map, classes, spacing, settings), "seconds": seconds})
    dscs, nsds = [s["dsc"] for s in steps], [s["nsd"] for s in steps]
    result = {
        "classes": list(classes), "box": settings.box, "dsc": dscs, "nsd": nsds,
        "step_seconds": [round(s["seconds"], 4) for s in steps],
        "dsc_auc": auc(dscs, settings.clicks), "nsd_auc": auc(nsds, settings.clicks),
        "final_dsc": dscs[-1], "final_nsd": nsds[-1],
        "total_seconds": round(used, 4), "seconds_per_step": round(used / ran, 4) if ran else 0.0,
        "time_limit_s": budget, "failed_at_step": failed,
        "per_class": {
            name: {
                "dsc": [s["per_class"][name]["dsc"] for s in steps],
                "nsd": [s["per_class"][name]["nsd"] for s in steps],
                "box": [int(v) for v in (*boxes[name].lo, *boxes[name].hi, boxes[name].mid)] if settings.box else None,
                "clicks": [[*coord, label] for coord, label in clicks[name]],
            }
            for name in classes
        },
    }  # fmt: skip
    return result, label_map


_MEANS = ("dsc_auc", "nsd_auc", "final_dsc", "final_nsd", "seconds_per_step", "total_seconds")


def summarize_segfm3d(cases: Mapping[str, Mapping[str, Any]], settings: Segfm3dSettings) -> dict[str, Any]:
    """The ``protocol`` section of ``summary.json``: the protocol's name, rules and settings, each case's result
    (:func:`run_case`) and the mean over the scored cases of every per-case number and of each step's DSC and NSD
    (a case without foreground, ``{"classes": []}``, is listed but not scored: ``n_skipped``)."""
    entries = [c for c in cases.values() if c.get("classes")]  # cases without foreground are not scored
    mean: dict[str, Any] = {"n_cases": len(entries), "n_skipped": len(cases) - len(entries)}
    if entries:
        mean.update({key: float(np.mean([float(c[key]) for c in entries])) for key in _MEANS})
        mean["dsc"] = [float(v) for v in np.mean([c["dsc"] for c in entries], axis=0)]
        mean["nsd"] = [float(v) for v in np.mean([c["nsd"] for c in entries], axis=0)]
        mean["n_failed"] = sum(c.get("failed_at_step") is not None for c in entries)
    rules = (
        f"CVPR 2025 SegFM3D: per class a box (slice range, in-plane box on the median voxel's slice) "
        f"{'then' if settings.box else 'skipped (scored 0), then'} {settings.clicks} clicks at the centre (voxel EDT) "
        f"of the largest 26-connected error, positive where missed; one label map per step. DSC and NSD "
        f"({settings.nsd_tolerance_mm:g} mm, 0 unless DSC > {settings.nsd_min_dsc:g}) averaged over classes; AUC: "
        f"trapezoid over the click steps at unit spacing, not normalised; final = last step; seconds: model time."
    )
    return {
        "name": PROTOCOL,
        "rules": rules,
        "settings": asdict(settings),
        "per_case": {case: dict(result) for case, result in cases.items()},
        "mean": mean,
    }


def protocol_per_case(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per-case protocol numbers of a ``summary.json`` for results tables: ``{case: {dsc_auc, nsd_auc, final_dsc,
    final_nsd, seconds_per_step}}``.

    Raises:
        EvaluationError: the summary has no ``protocol`` section of this protocol.
    """
    section = summary.get("protocol")
    if not isinstance(section, Mapping) or section.get("name") != PROTOCOL:
        raise EvaluationError(
            "this summary.json has no segfm3d 'protocol' section; evaluate the promptable run with "
            "`medseg evaluate run_dir=... task.evaluation.protocol=segfm3d`."
        )
    keys = ("dsc_auc", "nsd_auc", "final_dsc", "final_nsd", "seconds_per_step")
    return {
        case: {k: float(entry[k]) for k in keys} for case, entry in section["per_case"].items() if entry.get("classes")
    }
