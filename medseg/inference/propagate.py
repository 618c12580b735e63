"""Slice propagation (MedSAM / micro-sam style) of one object through a volume with any 2-D promptable model.

:func:`propagate` segments the prompted slice, then walks to the neighbouring slices in both directions along
``axis``, prompting each slice with what the previous one gave (``carry``: its bounding box, an interior point,
its logits as SAM's mask input, or a combination, e.g. ``"box+mask"``). A direction stops at the first slice whose
mask is empty, has an IoU with the previous slice's mask below ``min_iou``, or an area outside
``[min_area, max_area]`` times the start slice's area; that slice is not kept. Image embeddings are computed
``batch_size`` slices at a time in the walking direction (at most ``batch_size - 1`` are computed past the end).

Every slice goes through the LiteMedSAM recipe of :mod:`medseg.inference.recipe` (intensities of the whole volume
first, then resizing, normalisation and padding per slice), and the kept logits are brought back to the slice size.

Defaults. ``min_iou=0.75`` follows micro-sam's ``iou_threshold`` (0.8 there) with a little room for small
cross-sections, where one pixel of drift already costs IoU: consecutive masks of a smoothly varying structure overlap
far more (0.83-0.97 on the synthetic tube of the tests), while past an object's end a carried box makes LiteMedSAM
return a shrinking blob of background whose IoU with the last true mask falls to about 0.6-0.7. ``min_area=0.1``
stops when the object has shrunk to a tenth of the prompted slice's area, ``max_area=4`` when it balloons (a leak
into neighbouring tissue). LiteMedSAM was trained with boxes only, so ``carry="box"`` (the default) is the one that
works for it; ``points`` suits models trained with clicks (SAM, micro-sam).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from medseg.errors import ConfigError
from medseg.inference.cache import EmbeddingCache, embedding_key, weights_hash
from medseg.inference.progress import progress_bar
from medseg.inference.recipe import (
    SliceRecipe,
    above_threshold,
    embed_slices,
    model_device,
    postprocess_logits,
    preprocess_slice,
    slice_geometry,
    to_uint8,
)
from medseg.prompts.contract import Prompts
from medseg.prompts.geometry import to_recipe_input

__all__ = ["PropagationConfig", "PropagationResult", "propagate", "stop_reason"]


@dataclass(frozen=True)
class PropagationConfig:
    """How propagation carries a mask to the next slice and when it stops (see the module docstring).

    Attributes:
        axis: array axis of the volume to walk along.
        carry: ``box``, ``points``, ``mask`` or a ``+``-combination (``box+mask``).
        box_margin: pixels (model-input space) added around a carried box; 3 is MedSAM's ``bbox_shift``.
        min_iou: stop when the IoU with the previous slice's mask falls below it (``None``: off).
        min_area, max_area: stop when the area leaves ``[min_area, max_area]`` x the start slice's (``None``: off).
        batch_size: slices per encoder call.
        threshold: foreground probability.
    """

    axis: int = 2
    carry: str = "box"
    box_margin: int = 3
    min_iou: float | None = 0.75
    min_area: float | None = 0.1
    max_area: float | None = 4.0
    batch_size: int = 4
    threshold: float = 0.5

    def __post_init__(self) -> None:
        parts = set(self.carry.split("+"))
        if not parts or parts - {"box", "points", "mask"}:
            raise ConfigError(f"carry must combine box, points and mask with '+', got {self.carry!r}.")
        if parts == {"mask"}:
            raise ConfigError("carry='mask' alone gives SAM no location; use 'box+mask' or 'points+mask'.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}.")


@dataclass
class PropagationResult:
    """Attributes: ``mask`` ``(X, Y, Z)`` bool; ``first``/``last`` kept slice indices; ``stopped`` the reason per
    direction (``empty``, ``iou``, ``area``, ``growth``, ``edge``); ``encoded`` slices run through the encoder."""

    mask: np.ndarray
    first: int
    last: int
    stopped: dict[str, str] = field(default_factory=dict)
    encoded: int = 0


def _carried(mask: torch.Tensor, logits: torch.Tensor, config: PropagationConfig, size: int) -> Prompts:
    parts, kwargs = set(config.carry.split("+")), {}
    rows, cols = torch.nonzero(mask, as_tuple=True)
    if "box" in parts:
        m = config.box_margin
        box = [rows.min() - m, cols.min() - m, rows.max() + m, cols.max() + m]
        kwargs["box"] = torch.stack(box).float().clamp(0, size - 1)[None]
    if "points" in parts:
        depth = distance_transform_edt(mask.cpu().numpy())
        kwargs["point_coords"] = torch.tensor([[np.unravel_index(depth.argmax(), depth.shape)]], dtype=torch.float32)
        kwargs["point_labels"] = torch.ones(1, 1, dtype=torch.long)
    if "mask" in parts:
        kwargs["prev_mask"] = logits
    return Prompts(**kwargs)


def stop_reason(mask: Any, previous: Any, start_area: float, config: PropagationConfig) -> str | None:
    """Why propagation stops at ``mask`` (boolean torch tensor or array) after ``previous``: ``empty``, ``area``,
    ``growth``, ``iou``, or ``None`` to go on. One rule set for every propagation (SAM 2's memory walk included)."""
    area = float(mask.sum())
    if area == 0:
        return "empty"
    if config.min_area is not None and area < config.min_area * start_area:
        return "area"
    if config.max_area is not None and area > config.max_area * start_area:
        return "growth"
    if config.min_iou is not None:
        iou = float((mask & previous).sum()) / float((mask | previous).sum())
        if iou < config.min_iou:
            return "iou"
    return None


@torch.inference_mode()
def propagate(
    model: torch.nn.Module,
    volume: np.ndarray,
    index: int,
    box: Sequence[float] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
    *,
    prompts: Prompts | None = None,
    recipe: SliceRecipe | None = None,
    config: PropagationConfig | None = None,
    cache: EmbeddingCache | None = None,
    progress: bool = False,
) -> PropagationResult:
    """Segment one object through a volume from a prompt on one slice (MedSAM / micro-sam style propagation).

    Args:
        model: any :class:`~medseg.models.promptable.PromptableSegmenter`.
        volume: ``(X, Y, Z)`` raw intensities (HU, MR units, or 0-255 with ``intensity="none"``).
        index: the prompted slice along ``config.axis``.
        box, points, point_labels: the prompt on that slice, in the slice's array order (as
            :func:`~medseg.inference.recipe.segment_slice` takes it).
        prompts: the same as one 2-D prompt set (batch of one, pixels of the slice): what the promptable path passes.
        recipe: intensity settings; MR percentiles and CT windows are applied to the whole volume at once.
        config: carry and stop rules.
        cache: optional embedding cache (keys per raw slice, as :func:`~medseg.inference.recipe.predict_slice` uses).
        progress: show a rich progress bar over the slices.

    Returns:
        :class:`PropagationResult` whose ``mask`` has the volume's shape.
    """
    recipe, config = recipe or SliceRecipe(), config or PropagationConfig()
    volume = np.asarray(volume)
    if volume.ndim != 3 or not 0 <= config.axis < 3:
        raise ConfigError(f"propagate takes an (X, Y, Z) volume and axis 0-2, got {volume.shape}, {config.axis}.")
    raw = np.moveaxis(volume, config.axis, 0)
    depth, size = raw.shape[0], model.image_size
    if not 0 <= index < depth:
        raise ConfigError(f"slice index {index} is outside 0..{depth - 1} along axis {config.axis}.")
    bounds = recipe.bounds(volume)
    signature = recipe.signature(size, bounds)
    geometry = slice_geometry(raw.shape[1:], size)
    embeddings: dict[int, torch.Tensor] = {}
    encoded = 0

    def embedding(k: int, step: int) -> torch.Tensor:
        nonlocal encoded
        if k not in embeddings:
            wanted = [j for j in range(k, k + step * config.batch_size, step) if 0 <= j < depth and j not in embeddings]
            missing = []
            for j in wanted:
                found = None if cache is None else cache.get(_slice_key(cache, raw[j], model, signature))
                if found is not None:
                    cache.hits += 1
                    embeddings[j] = found.to(model_device(model))
                else:
                    missing.append(j)
            if missing:
                batch, _ = preprocess_slice(to_uint8(raw[missing], recipe, bounds), size)
                out = embed_slices(model, batch)
                encoded += len(missing)
                if cache is not None:
                    cache.misses += len(missing)
                for j, e in zip(missing, out):
                    embeddings[j] = e[None]
                    if cache is not None:
                        cache.put(_slice_key(cache, raw[j], model, signature), e[None])
        return embeddings[k]

    valid = torch.zeros(size, size, dtype=torch.bool, device=model_device(model))
    valid[: geometry.resized[0], : geometry.resized[1]] = True
    kept: dict[int, torch.Tensor] = {}

    def decode(k: int, step: int, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = model.decode(embedding(k, step), prompts)
        logits = logits[:, :1].float()
        return logits, above_threshold(logits[0, 0], config.threshold) & valid

    if prompts is None:
        prompts = Prompts.single(box, points, point_labels)
    elif box is not None or points is not None:
        raise ConfigError("give the starting slice's prompts either as `prompts` or as box/points, not both.")
    logits, mask = decode(index, 1, to_recipe_input(prompts, geometry))
    start_area = float(mask.sum())
    stopped: dict[str, str] = {}
    if start_area > 0:
        kept[index] = logits
        with progress_bar(progress, depth, "propagating") as advance:
            for name, step in (("forward", 1), ("backward", -1)):
                previous, previous_logits, k = mask, logits, index + step
                stopped[name] = "edge"
                while 0 <= k < depth:
                    advance()
                    next_logits, next_mask = decode(k, step, _carried(previous, previous_logits, config, size))
                    reason = stop_reason(next_mask, previous, start_area, config)
                    if reason is not None:
                        stopped[name] = reason
                        break
                    kept[k], previous, previous_logits, k = next_logits, next_mask, next_logits, k + step
    else:
        stopped = {"forward": "empty", "backward": "empty"}
    out = np.zeros(raw.shape, dtype=bool)
    for k, slice_logits in kept.items():
        out[k] = above_threshold(postprocess_logits(slice_logits, geometry)[0, 0], config.threshold).cpu().numpy()
    first, last = (min(kept), max(kept)) if kept else (index, index - 1)
    return PropagationResult(np.moveaxis(out, 0, config.axis), first, last, stopped, encoded)


def _slice_key(cache: EmbeddingCache, raw_slice: np.ndarray, model: torch.nn.Module, signature: str) -> str:
    return embedding_key(raw_slice, weights_hash(model), signature)
