"""Whole-volume logits from 3D models (MONAI sliding window) and from 2D models (slice by slice).

Evaluation runs on full volumes, never on the patches or slices a model trained on. A 3D model sees overlapping
windows of ``roi_size`` blended by MONAI's :func:`~monai.inferers.sliding_window_inference` (Gaussian weights by
default, so window borders do not show). A 2D model sees every slice along ``slice_axis``, brought to its input size
exactly as training brought it there (``conf/data/sampling/slices_2d.yaml``: longest side resized to ``size`` with
bilinear interpolation, zero padding at the end), and its logits are taken back to the slice's own size by the inverse
pair :func:`to_model_input` / :func:`from_model_output`.

The result is always ``(K, X, Y, Z)`` float32 logits on the preprocessed grid, on the input's device; map them to the
native grid with :func:`medseg.inference.to_native`.

Batches. ``sw_batch_size`` slices or windows go through the model per forward pass; a batch only groups inputs that
the model treats independently (eval mode), so it changes the speed and never the prediction beyond float rounding
(``tests/inference/test_sliding.py`` checks that labels are identical). On CUDA a 2-D model takes a whole volume's
slices at once, up to :data:`CUDA_SLICE_BATCH` (:func:`slice_batch_size`): a GPU is fed by large batches, while on a
CPU a larger batch only costs memory. Either way a batch that runs out of GPU memory is halved and retried
(down to one slice or window) instead of failing the evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Resize, SpatialPad

from medseg.errors import ConfigError, MedsegError
from medseg.inference.precision import inference_precision
from medseg.inference.progress import progress_bar
from medseg.prompts.geometry import SliceGeometry  # the 2-D model-input geometry, defined with its coordinate maps

__all__ = [
    "CUDA_SLICE_BATCH",
    "InferenceError",
    "SliceGeometry",
    "from_model_output",
    "predict_logits",
    "slice_batch_size",
    "to_model_input",
]

CUDA_SLICE_BATCH = 32  # slices per forward pass of a 2-D model on CUDA: a 13-slice quickstart slab in one pass


class InferenceError(MedsegError):
    """A model's output cannot be turned into a prediction (wrong type or shape)."""


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def to_model_input(slices: torch.Tensor, size: int, mode: str = "bilinear") -> tuple[torch.Tensor, SliceGeometry]:
    """Resize ``(N, C, H, W)`` slices so that their longest side is ``size``, then zero-pad them to ``size x size``.

    These are the very MONAI transforms of ``conf/data/sampling/slices_2d.yaml`` (``Resize(size_mode="longest")``
    then ``SpatialPad(method="end")``), applied to all slices and channels at once, so a model sees at inference
    what it saw in training.

    Returns:
        The ``(N, C, size, size)`` batch and the :class:`SliceGeometry` that :func:`from_model_output` inverts.
    """
    if slices.ndim != 4:
        raise InferenceError(f"to_model_input expects (N, C, H, W) slices, got shape {tuple(slices.shape)}.")
    n, c, h, w = slices.shape
    stacked = slices.reshape(n * c, h, w)  # MONAI's channel axis carries every slice and channel alike
    resized = _plain(Resize(spatial_size=size, size_mode="longest", mode=mode)(stacked))
    padded = _plain(SpatialPad(spatial_size=[size, size], method="end")(resized))
    geometry = SliceGeometry(original=(h, w), resized=(int(resized.shape[-2]), int(resized.shape[-1])), size=size)
    return padded.reshape(n, c, size, size), geometry


def from_model_output(output: torch.Tensor, geometry: SliceGeometry, mode: str = "bilinear") -> torch.Tensor:
    """Undo :func:`to_model_input` on ``(N, K, s, s)`` model outputs: drop the padding, resize to the slice size.

    ``s`` may differ from the input size (e.g. SAM's 256-pixel low-resolution masks for a 1024-pixel input); the
    unpadded region is scaled accordingly. Logits are resized bilinearly, before any argmax.

    Returns:
        ``(N, K, H, W)`` float tensor on the slices' original grid.
    """
    if output.ndim != 4 or output.shape[-1] != output.shape[-2]:
        raise InferenceError(f"a 2D model must return (N, K, S, S) logits, got shape {tuple(output.shape)}.")
    n, k, s, _ = output.shape
    scale = s / geometry.size
    h, w = (max(1, round(r * scale)) for r in geometry.resized)
    cropped = output[..., :h, :w].reshape(n * k, h, w).float()
    restored = _plain(Resize(spatial_size=geometry.original, mode=mode)(cropped))
    return restored.reshape(n, k, *geometry.original)


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration, then the model's previous mode again."""
    was_training = model.training if isinstance(model, torch.nn.Module) else False
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _check_output(output: object, what: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise InferenceError(
            f"the {what} model returned {type(output).__name__}; predict_logits needs a tensor of logits. Wrap the "
            f"model so that forward() returns the segmentation logits only."
        )
    return output


def slice_batch_size(device: torch.device, requested: int, count: int) -> int:
    """Slices per forward pass of a 2-D model over a volume of ``count`` slices.

    ``requested`` (the run's ``sw_batch_size``) on a CPU, where a larger batch is no faster. On CUDA every slice of
    the volume in one pass, or :data:`CUDA_SLICE_BATCH` slices of a larger volume, and never fewer than ``requested``.
    """
    if device.type != "cuda":
        return requested
    return max(requested, min(count, CUDA_SLICE_BATCH))


def _halved(batch_size: int, error: torch.cuda.OutOfMemoryError) -> int:
    """The next batch size after ``error``; re-raises it when a single slice or window did not fit."""
    if batch_size <= 1:
        raise error
    torch.cuda.empty_cache()
    return batch_size // 2


def _predict_slices(
    model: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    size: int,
    batch_size: int,
    slice_axis: int,
    device: torch.device,
    precision: str,
    progress: bool,
) -> torch.Tensor:
    slices = volume.movedim(slice_axis + 1, 0).to(device)  # (D, C, H, W), sent to the model's device once
    batch_size = slice_batch_size(device, batch_size, slices.shape[0])
    outputs, start = [], 0
    with progress_bar(progress, slices.shape[0], "slices") as advance:
        while start < slices.shape[0]:
            try:
                batch, geometry = to_model_input(slices[start : start + batch_size], size)
                with inference_precision(precision, device):
                    logits = _check_output(model(batch), "2D")
            except torch.cuda.OutOfMemoryError as error:
                batch_size = _halved(batch_size, error)
                continue
            outputs.append(from_model_output(logits.float(), geometry).to(volume.device))
            start += batch.shape[0]
            for _ in range(batch.shape[0]):
                advance(None)
    return torch.cat(outputs).movedim(0, slice_axis + 1)


def predict_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    spatial_dims: int,
    roi_size: Sequence[int] | int,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    slice_axis: int = 2,
    mode: Literal["gaussian", "constant"] = "gaussian",
    device: torch.device | str | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """Logits of a whole preprocessed volume, from a 3D model by sliding window or from a 2D model slice by slice.

    Args:
        model: maps ``(B, C, *roi)`` to ``(B, K, *roi)`` logits (3D), or ``(B, C, S, S)`` to ``(B, K, s, s)`` (2D).
        image: ``(C, X, Y, Z)`` volume after the deterministic transforms (the datamodule's val/test ``image``).
        spatial_dims: 3 for a volumetric model, 2 for a slice model.
        roi_size: 3D window in voxels (``[x, y, z]``; a volume smaller than it is padded by MONAI), or the 2D
            model's square input size in pixels (``size`` of ``slices_2d.yaml``; an int or ``[S, S]``).
        sw_batch_size: windows (3D) or slices (2D) per forward pass; on CUDA a 2D model takes more slices at once
            (:func:`slice_batch_size`), and a batch that runs out of GPU memory is halved.
        overlap: fraction of a window shared with its neighbour (3D).
        slice_axis: spatial axis the 2D model slices along (2 = axial after ``Orientationd("RAS")``).
        mode: blending of overlapping windows (3D): ``gaussian`` weighs window centres more, ``constant`` averages.
        device: where the model runs (default: the model's parameters' device, else the image's); the stitched
            volume stays on the image's device, so a large volume need not fit on the GPU.
        precision: ``fp32``, ``bf16``, ``fp16`` or ``auto`` (:mod:`medseg.inference.precision`).
        progress: show a progress bar.

    Returns:
        ``(K, X, Y, Z)`` float32 logits on the preprocessed grid, on the image's device.

    Raises:
        ConfigError: bad ``spatial_dims``, ``roi_size``, ``slice_axis`` or image shape.
        InferenceError: the model returns something other than a tensor of logits.
    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 (slice model) or 3 (volumetric model), got {spatial_dims}.")
    if image.ndim != 4:
        raise ConfigError(f"predict_logits expects a (C, X, Y, Z) volume, got shape {tuple(image.shape)}.")
    if sw_batch_size < 1:
        raise ConfigError(f"sw_batch_size must be at least 1, got {sw_batch_size}.")
    roi = [int(roi_size)] if isinstance(roi_size, int) else [int(r) for r in roi_size]
    if device is None:
        parameter = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = parameter.device if parameter is not None else image.device
    device = torch.device(device)
    volume = _plain(image).float()
    with _evaluating(model):
        if spatial_dims == 2:
            if slice_axis not in (0, 1, 2):
                raise ConfigError(f"slice_axis must be 0, 1 or 2 (a spatial axis), got {slice_axis}.")
            if len(set(roi)) != 1 or len(roi) > 2:
                raise ConfigError(f"a 2D model's roi_size is its square input size (S or [S, S]), got {roi_size}.")
            return _predict_slices(model, volume, roi[0], sw_batch_size, slice_axis, device, precision, progress)
        if len(roi) == 1:
            roi = roi * 3
        if len(roi) != 3:
            raise ConfigError(f"a 3D model's roi_size needs 3 sizes in voxels, got {roi_size}.")

        def predictor(window: torch.Tensor) -> torch.Tensor:
            with inference_precision(precision, device):
                return _check_output(model(window), "3D").float()

        while True:  # a window batch that runs out of GPU memory is halved and the volume run again
            try:
                logits = sliding_window_inference(
                    volume[None], roi, sw_batch_size, predictor, overlap=overlap, mode=mode,
                    sw_device=device, device=volume.device, progress=progress,
                )  # fmt: skip
                break
            except torch.cuda.OutOfMemoryError as error:
                sw_batch_size = _halved(sw_batch_size, error)
    return _plain(logits)[0].float()
