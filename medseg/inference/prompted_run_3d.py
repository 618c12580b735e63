"""Prompts file -> label map with a 3-D volumetric promptable run, prepared exactly as its 3-D evaluation does.

``medseg evaluate`` scores a volumetric promptable run (``model=promptable_3d``, ``spatial_dims == 3``) with
:func:`medseg.evaluation.interactive_run.evaluate_case_3d` on each test volume as stored:

1. the volume is prepared (:func:`medseg.inference.prepared.prepare_volume`): the run's intensity transforms, then
   the RAS-oriented grid by axis permutation and flips (no interpolation), as for 2-D runs;
2. it is min-max scaled to [0, 1] per channel (:func:`medseg.inference.recipe.minmax_per_image`, as training
   scales each patch);
3. when the run resamples (its ``Spacingd``), the model sees it zoomed trilinearly to that spacing
   (:func:`~medseg.inference.prepared.model_grid`), so its sliding windows see the training scale; boxes and points
   are mapped onto the zoomed grid and the logits zoomed back to the RAS voxels
   (:func:`medseg.inference.volumetric.volume_predictor`).

:func:`predict_run_prompts_3d` replays exactly this on one image of ``medseg predict``, with the evaluation's own
functions. Each object of the prompts file (voxel indices of the file; world prompts are converted by
:func:`medseg.prompts.files.load_prompts`) is mapped to the RAS grid with the data's permutation and flips, and run
once per box with all its points (labels 1 positive, 0 negative), or once with its points alone when it has no box;
an object's mask is the union of its boxes' masks at probability > 0.5. Objects are painted in file order (a later
object wins where two overlap, as in the 2-D path) and the label map is brought back to the file's array order.
A 2-D box (``k0 == k1``) is a 3-D box one voxel thick to this model: there is no slice propagation in 3-D.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.errors import InputShapeError
from medseg.inference.loaded import LoadedModel
from medseg.inference.prepared import model_grid, prepare_volume
from medseg.inference.prompted import PromptedResult, object_label, object_prompts
from medseg.inference.recipe import minmax_per_image
from medseg.inference.run_settings import run_prompt_settings
from medseg.inference.volumetric import volume_predictor
from medseg.prompts.contract import Prompts
from medseg.prompts.files import ObjectPrompts

__all__ = ["predict_run_prompts_3d"]


class _CountedEncodes(torch.nn.Module):
    """A volumetric model that counts the windows its encoder sees (``PromptedResult.encoded``); results unchanged."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.roi_size, self.windows = model, model.roi_size, 0
        self.train(model.training)

    def encode(self, windows: torch.Tensor) -> Any:
        self.windows += int(windows.shape[0])
        return self.model.encode(windows)

    def decode(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.decode(*args, **kwargs)


def predict_run_prompts_3d(
    loaded: LoadedModel, image: MetaTensor, objects: Sequence[ObjectPrompts | Prompts]
) -> PromptedResult:
    """Segment the objects of a prompts file with a trained 3-D volumetric promptable run (module docstring).

    Args:
        loaded: a volumetric promptable run (:func:`medseg.inference.sources.load_run`) or release with
            ``data.preprocess``; ``task.inference.overlap`` sets the sliding-window overlap (default 0.25).
        image: ``(C, X, Y, Z)`` MetaTensor as read, affine in RAS+ mm; ``C`` must be the model's channels.
        objects: prompts in voxel indices of ``image`` (file array order).

    Returns:
        :class:`~medseg.inference.prompted.PromptedResult`: ``labels`` in the file's array order and shape,
        ``encoded`` the windows run through the encoder (each once per image, whatever the objects).

    Raises:
        ConfigError: a run config without preprocessing.
        InputShapeError: an image whose channels differ from the model's.
    """
    channels = getattr(loaded.model, "in_channels", None)
    if isinstance(channels, int) and image.shape[0] != channels:
        raise InputShapeError(
            f"{loaded.source} was trained on {channels}-channel volumes; this image has {image.shape[0]}. Give the "
            f"volume with the run's channels."
        )
    settings = run_prompt_settings(loaded)
    volume = prepare_volume(image, settings.intensity)
    scaled = minmax_per_image(torch.from_numpy(volume.image).float()[None])[0]
    model = _CountedEncodes(loaded.model)
    grid = model_grid(volume.shape, volume.spacing, settings.target_spacing)
    predictor = volume_predictor(model, scaled, grid, settings.overlap)
    prompts = [volume.orientation.prompts(object_prompts(obj)) for obj in objects]
    top = max((object_label(p) for p in prompts), default=0)
    labels = np.zeros(volume.shape, dtype=np.uint16 if top > 255 else np.uint8)
    with torch.no_grad():
        for item in prompts:
            mask = np.zeros(volume.shape, dtype=bool)
            for b in range(item.batch_size):
                mask |= (predictor(item[b], None) > 0.5).cpu().numpy()
            labels[mask] = object_label(item)
    return PromptedResult(volume.native(labels), model.windows, [])
