"""Prompted whole-volume inference for volumetric promptable models: sliding windows with prompts mapped per window.

A volumetric promptable model (:class:`~medseg.models.volumetric.VolumetricPromptableSegmenter`) sees windows of its
``roi_size``; a CT volume is usually larger (e.g. 160^3 for a 64^3 roi). :func:`predict_prompted` covers the volume
with overlapping windows as MONAI's sliding window does (``dense_patch_slices``, windows ``roi * (1 - overlap)``
apart, the last one flush with the end) and, as MONAI VISTA3D's ``point_based_window_inferer`` does, gives each
window only the prompts that concern it:

* points inside the window are shifted into window coordinates (global minus the window's start); points outside
  become padding (label ``-1``), so every window sees the same number of points;
* the box is clipped to the window;
* ``prev_mask`` is cropped to the window.

A window runs only for the objects (prompt sets) that the user pointed at there. An object with a box is run in the
windows its box intersects (the box bounds the object); one without, in the windows holding one of its positive
points. Negative points refine an object in a window that runs anyway but do not start one by themselves, and nor
does the previous mask: as in VISTA3D's ``point_based_window_inferer``, a window without a prompt of the object is not
re-predicted, and the voxels that no window of the object covered keep the previous mask's logits (``fill_value``, a
large negative logit, i.e. background, when there is none). A window holding only previous-mask foreground is a
prompt the model never trains on (every training patch holds its object's clicks or box): re-running it let a
correction click elsewhere erase or bloat the object there, so clicks made Dice worse. The encoder runs once per
window that any object needs and the decoder once for all the objects that need it. Overlapping windows are blended
with Gaussian importance weights (MONAI's ``compute_importance_map``).

A volume smaller than the roi along an axis is zero-padded at the end of that axis, which leaves voxel coordinates
unchanged; the padding is cropped from the result.

:func:`volume_predictor` is the 3-D model step of medseg's one promptable path (``medseg predict``, the interactive
evaluation and validation during training): a ``predict_fn`` over one whole volume that zooms it to the model's grid
(:func:`medseg.prompts.geometry.zoom_prompts` moves the prompts there), runs :func:`predict_prompted` with each
window encoded once, and zooms the logits back.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices

from medseg.errors import ConfigError
from medseg.inference.sliding import InferenceError
from medseg.models.prompt_encoder_3d import mask_as_logits
from medseg.prompts.contract import Prompts
from medseg.prompts.geometry import zoom_prompts

__all__ = ["FILL_VALUE", "WindowEncodings", "predict_prompted", "volume_predictor", "window_prompts", "window_starts"]

FILL_VALUE = -1.0e4  # logit of voxels no window was run for (sigmoid 0; finite in float16)


def window_starts(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Start voxel of every sliding window over a volume of ``shape`` (each axis at least ``roi``), MONAI's grid."""
    interval = [r if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(shape, roi)]
    return [tuple(int(s.start) for s in window) for window in dense_patch_slices(shape, roi, interval)]


def window_prompts(prompts: Prompts, start: Sequence[int], roi: Sequence[int]) -> tuple[Prompts | None, torch.Tensor]:
    """The prompts of every object as seen by the window at ``start`` of ``roi`` voxels, and which objects it concerns.

    Args:
        prompts: 3-D prompts of ``B`` objects in voxels of the whole volume; ``prev_mask`` as ``(B, 1, X, Y, Z)``.
        start: the window's first voxel on each axis.
        roi: the window's size in voxels.

    Returns:
        ``(window prompts for the active objects or None if there is none, active (B,) bool)``.
    """
    lo = torch.as_tensor([float(s) for s in start])
    hi = lo + torch.as_tensor([float(r) for r in roi]) - 1  # last voxel inside, inclusive
    active = torch.zeros(prompts.batch_size, dtype=torch.bool)
    fields: dict[str, torch.Tensor] = {}
    if prompts.point_coords is not None:
        coords, labels = prompts.point_coords.cpu(), prompts.point_labels.cpu()
        inside = ((coords >= lo) & (coords <= hi)).all(-1) & (labels >= 0)
        active |= (inside & (labels == 1)).any(-1)
        fields["point_coords"] = torch.where(inside[..., None], coords - lo, torch.zeros_like(coords))
        fields["point_labels"] = torch.where(inside, labels, torch.full_like(labels, -1))
    if prompts.box is not None:
        box = prompts.box.cpu()
        clipped = torch.cat([torch.maximum(box[:, :3], lo), torch.minimum(box[:, 3:], hi)], dim=1) - lo.repeat(2)
        meets = (clipped[:, 3:] >= clipped[:, :3]).all(-1)
        fields["box"] = torch.where(meets[:, None], clipped, torch.zeros_like(clipped))
    if prompts.prev_mask is not None:  # cropped for the window; its foreground alone does not run the window
        crop = tuple(slice(int(s), int(s) + int(r)) for s, r in zip(start, roi))
        fields["prev_mask"] = prompts.prev_mask[(slice(None), slice(None), *crop)]
    if prompts.box is not None:  # a box bounds its object: outside it nothing is run, inside it always
        active = meets
    if not active.any():
        return None, active
    index = active.nonzero()[:, 0]
    return Prompts(**{k: v[index.to(v.device)] for k, v in fields.items()}), active


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def predict_prompted(
    model: torch.nn.Module,
    image: torch.Tensor,
    prompts: Prompts,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
    amp: bool = False,
    fill_value: float = FILL_VALUE,
) -> torch.Tensor:
    """Mask logits of every prompted object over a whole volume.

    Args:
        model: a volumetric promptable model (``encode(volumes) -> embeddings`` whose ``expand(n)`` repeats one
            volume's embedding, ``decode(embeddings, prompts) -> (logits (n, 1, *roi), iou)``, ``roi_size``).
        image: ``(C, X, Y, Z)`` preprocessed volume (the model's input space).
        prompts: 3-D prompts of ``B`` objects in voxels of ``image`` (array order, inclusive boxes); ``prev_mask``
            ``(B, 1, X, Y, Z)`` logits or probabilities if given: each run window gets its crop, and the voxels
            that no run window covers keep it (as logits).
        roi_size: window in voxels; default the model's ``roi_size``.
        overlap: fraction of a window shared with its neighbour, per axis.
        mode: ``gaussian`` (window centres weigh more) or ``constant`` blending.
        device: where the model runs (default: its parameters' device); the result stays on the image's device.
        amp: run the model under ``torch.autocast``.
        fill_value: logit of voxels that no window of an object covered, when there is no ``prev_mask``.

    Returns:
        ``(B, X, Y, Z)`` float32 logits, on the image's device.

    Raises:
        ConfigError: a bad image, roi or overlap.
        PromptError: prompts outside the volume.
        InferenceError: the model's logits do not have the window's size.
    """
    if image.ndim != 4:
        raise ConfigError(f"predict_prompted expects a (C, X, Y, Z) volume, got shape {tuple(image.shape)}.")
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}.")
    roi = [int(r) for r in (roi_size if roi_size is not None else model.roi_size)]
    if len(roi) != 3:
        raise ConfigError(f"roi_size needs 3 sizes in voxels, got {roi_size}.")
    shape = tuple(int(s) for s in image.shape[1:])
    prompts.check_bounds(shape)
    if prompts.prev_mask is not None and tuple(prompts.prev_mask.shape[2:]) != shape:
        raise ConfigError(f"prev_mask {tuple(prompts.prev_mask.shape)} does not cover the volume {shape}.")
    if device is None:
        parameter = next(iter(model.parameters()), None)
        device = parameter.device if parameter is not None else image.device
    device = torch.device(device)
    volume = image.as_tensor() if hasattr(image, "as_tensor") else image
    padding = [max(r - s, 0) for s, r in zip(shape, roi)]
    pad = [p for axis in reversed(range(3)) for p in (0, padding[axis])]
    volume = F.pad(volume.float(), pad)
    previous = None  # what voxels that no window of an object covers keep: its previous logits, else fill_value
    if prompts.prev_mask is not None:
        previous = mask_as_logits(prompts.prev_mask.float()).to(volume.device)  # probabilities read as logits
        if any(padding):
            previous = F.pad(previous, pad, value=fill_value)
        prompts = prompts.with_prev_mask(previous)
    padded = tuple(volume.shape[1:])
    weight = compute_importance_map(tuple(roi), mode=mode, device=volume.device).float()
    total = torch.zeros(prompts.batch_size, *padded, device=volume.device)
    norm = torch.zeros(prompts.batch_size, *padded, device=volume.device)
    with _evaluating(model):
        for start in window_starts(padded, roi, overlap):
            local, active = window_prompts(prompts, start, roi)
            if local is None:
                continue
            crop = tuple(slice(s, s + r) for s, r in zip(start, roi))
            window = volume[(slice(None), *crop)][None].to(device)
            with torch.autocast(device_type=device.type, enabled=amp):
                embeddings = model.encode(window)
                logits, _ = model.decode(embeddings.expand(local.batch_size), local.to(device))
            if tuple(logits.shape[2:]) != tuple(roi):
                raise InferenceError(f"the model returned logits {tuple(logits.shape)} for a window of {roi} voxels.")
            index = active.nonzero()[:, 0].to(volume.device)
            region = (index, *crop)
            total[region] += logits[:, 0].float().to(volume.device) * weight
            norm[region] += weight
    kept = fill_value if previous is None else previous[:, 0]
    logits = torch.where(norm > 0, total / norm.clamp_min(torch.finfo(norm.dtype).tiny), kept)
    return logits[(slice(None), *(slice(0, s) for s in shape))]


class WindowEncodings(torch.nn.Module):
    """A volumetric model whose ``encode`` remembers each window's embedding (keyed by the window's voxels).

    The windows of one volume are the same at every click; only the prompts change, so each is encoded once per
    volume, as the 2-D path encodes each slice once (:class:`~medseg.inference.cache.EmbeddingCache`). Put in front of
    several predictors of one volume (one per class), it shares their windows' embeddings too.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.roi_size = model, model.roi_size
        self._embeddings: dict[str, Any] = {}
        self.train(model.training)  # predict_prompted restores this mode on the model when it is done

    def encode(self, window: torch.Tensor) -> Any:
        key = hashlib.sha1(window.detach().float().cpu().numpy().tobytes()).hexdigest()
        if key not in self._embeddings:
            self._embeddings[key] = self.model.encode(window)
        return self._embeddings[key]

    def decode(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.decode(*args, **kwargs)


def volume_predictor(
    model: torch.nn.Module, volume: torch.Tensor, model_shape: Sequence[int] | None = None, overlap: float = 0.25
):
    """``predict_fn(prompts, prev_mask) -> (X, Y, Z)`` probabilities of a 3-D model over a whole volume.

    Each call runs :func:`predict_prompted` with the prompts (voxels of ``volume``) and, when ``prev_mask`` is given,
    the previous call's logits (on the model grid) as mask prompt, as the 2-D predictors keep their own logits between
    clicks. Each window is encoded once, whatever the clicks.

    Args:
        model: a volumetric promptable model (``roi_size``, ``encode``, ``decode``).
        volume: ``(C, X, Y, Z)`` intensities in the model's input range.
        model_shape: ``(X', Y', Z')`` grid the model sees (the volume zoomed trilinearly to the training spacing,
            :func:`medseg.inference.prepared.model_grid`); ``None``: the volume's own grid. Points and boxes are mapped
            onto it (:func:`~medseg.prompts.geometry.zoom_prompts`), logits zoomed back.
        overlap: sliding-window overlap (fraction of the roi).
    """
    native = tuple(int(s) for s in volume.shape[1:])
    target = native if model_shape is None else tuple(int(s) for s in model_shape)
    zoomed = target != native
    image = volume.float()
    if zoomed:
        image = F.interpolate(image[None], size=target, mode="trilinear", align_corners=False)[0]
    state: dict[str, torch.Tensor] = {}
    cached = WindowEncodings(model)

    @torch.no_grad()
    def predict(prompts: Prompts, prev_mask: torch.Tensor | None) -> torch.Tensor:
        previous = state.get("logits") if prev_mask is not None else None
        prompts = prompts.with_prev_mask(None if previous is None else previous[:, None])
        if zoomed:
            prompts = zoom_prompts(prompts, native, target)
        logits = predict_prompted(cached, image, prompts, overlap=overlap)
        state["logits"] = logits
        if zoomed:
            logits = F.interpolate(logits[:, None], size=native, mode="trilinear")[:, 0]
        return torch.sigmoid(logits[0])

    return predict
