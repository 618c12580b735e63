"""Prompts file -> label map with a 3-D volumetric promptable run, prepared exactly as its 3-D evaluation does.

``medseg evaluate`` scores a volumetric promptable run (``model=promptable_3d``, ``spatial_dims == 3``) with
:func:`medseg.evaluation.interactive_run.evaluate_case_3d` on each test volume as stored:

1. the run's deterministic *intensity* transforms (CT window, MR percentiles; resampling and cropping left out) are
   applied to the image as read, and the volume is reoriented to RAS by axis permutation and flips only (no
   interpolation), as :func:`medseg.inference.prompted_run.orient_for_run` does for 2-D runs;
2. the volume is min-max scaled to [0, 1] per channel (:func:`medseg.tasks.prompt_sampling.minmax_per_image`, as
   training scales each patch);
3. when the run resamples (its ``Spacingd``), the volume is zoomed trilinearly to that spacing (mm) so the model's
   sliding windows (:func:`medseg.inference.volumetric.predict_prompted`) see the training scale; boxes and points are
   mapped onto the zoomed grid and the logits zoomed back to the RAS voxels
   (:func:`~medseg.evaluation.interactive_run.volume_predictor`).

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
from medseg.inference.prompted import PromptedResult
from medseg.prompts.contract import Prompts
from medseg.prompts.files import ObjectPrompts

__all__ = ["object_prompts_3d", "predict_run_prompts_3d", "run_model_grid"]


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


def run_model_grid(loaded: LoadedModel, image: MetaTensor, oriented_shape: Sequence[int]) -> tuple[int, ...]:
    """Voxels per RAS axis of the grid the 3-D run's model sees: the RAS volume zoomed to the run's target spacing.

    Args:
        loaded: the run; its ``Spacingd`` (``data.preprocess``) gives the target spacing in mm (RAS order), as
            :func:`medseg.evaluate.evaluate_promptable_model` reads it. Without one the grid is unchanged.
        image: the image as read (its affine gives the native spacing in mm).
        oriented_shape: ``(X, Y, Z)`` of the RAS-permuted volume.
    """
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    from medseg.data.transforms import spacing_of
    from medseg.evaluation.interactive_run import model_grid
    from medseg.evaluation.metrics import spacing_from_affine
    from medseg.inference.dense import preprocessing_of

    affine = np.asarray(image.affine, dtype=np.float64)
    to_ras = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    native_spacing = spacing_from_affine(affine)
    spacing = [0.0] * 3
    for axis, (new_axis, _) in enumerate(to_ras):  # the file's voxel sizes (mm) along the RAS axes
        spacing[int(new_axis)] = float(native_spacing[axis])
    target = spacing_of(preprocessing_of(loaded))
    return model_grid(oriented_shape, spacing, target)


def object_prompts_3d(obj: ObjectPrompts) -> list[Prompts]:
    """One single-object :class:`Prompts` per box of ``obj`` (all its points with each), or one for points alone.

    Args:
        obj: an object's prompts in voxel indices of the volume the model is given (RAS grid).

    Returns:
        Prompts of batch size 1: ``box`` ``(1, 6)`` inclusive voxels, ``point_coords`` ``(1, P, 3)`` voxels and
        ``point_labels`` ``(1, P)`` (1 positive, 0 negative), as the 3-D evaluation prompts its predictor.
    """
    points = np.asarray(obj.points, dtype=np.float32).reshape(-1, 3)
    fields: dict[str, np.ndarray] = {}
    if len(points):
        fields = {"point_coords": points[None], "point_labels": np.asarray(obj.point_labels, dtype=np.int64)[None]}
    boxes = np.asarray(obj.boxes, dtype=np.float32).reshape(-1, 6)
    if not len(boxes):
        return [Prompts(**fields)]
    return [Prompts(box=box[None], **fields) for box in boxes]


def predict_run_prompts_3d(loaded: LoadedModel, image: MetaTensor, objects: Sequence[ObjectPrompts]) -> PromptedResult:
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
    from medseg.evaluation.interactive_run import intensity_transforms, volume_predictor
    from medseg.inference.dense import preprocessing_of
    from medseg.inference.prompted_run import _section, objects_to_oriented, orient_for_run
    from medseg.tasks.prompt_sampling import minmax_per_image

    channels = getattr(loaded.model, "in_channels", None)
    if isinstance(channels, int) and image.shape[0] != channels:
        raise InputShapeError(
            f"{loaded.source} was trained on {channels}-channel volumes; this image has {image.shape[0]}. Give the "
            f"volume with the run's channels."
        )
    volume = orient_for_run(image, intensity_transforms(preprocessing_of(loaded)))
    oriented_shape = tuple(int(s) for s in volume.image.shape[1:])
    scaled = minmax_per_image(torch.from_numpy(volume.image).float()[None])[0]
    overlap = float(_section(loaded.config, "task", "inference").get("overlap", 0.25))
    model = _CountedEncodes(loaded.model)
    predictor = volume_predictor(model, scaled, run_model_grid(loaded, image, oriented_shape), overlap)
    labels = np.zeros(oriented_shape, dtype=np.uint16 if max((o.label for o in objects), default=0) > 255 else np.uint8)
    with torch.no_grad():
        for obj in objects_to_oriented(objects, volume):
            mask = np.zeros(oriented_shape, dtype=bool)
            for prompts in object_prompts_3d(obj):
                mask |= (predictor(prompts, None) > 0.5).cpu().numpy()
            labels[mask] = int(obj.label)
    return PromptedResult(volume.native(labels), model.windows, [])
