"""Prompts file -> label map with a promptable run of ``medseg train``, prepared exactly as its evaluation does.

``medseg evaluate`` scores a 2-D promptable run (:mod:`medseg.evaluation.interactive_run`) on each test volume as
stored, not on the resampled training grid:

1. the volume is prepared (:func:`medseg.inference.prepared.prepare_volume`): the run's intensity transforms, then
   the RAS-oriented grid by axis permutation and flips, so that slices along the run's ``task.inference.slice_axis``
   are the planes it was trained on;
2. every slice is min-max scaled to [0, 1] after the longest side is resized to the model size (the slice recipe of
   :mod:`medseg.inference.recipe` with ``intensity="none"``, as training scales each slice);
3. objects are propagated along the slice axis (:mod:`medseg.inference.propagate`) with the run's
   ``task.evaluation.propagation`` settings, and the label map is brought back to the file's array order.

:func:`predict_run_prompts` replays exactly this on one image of ``medseg predict``. The prompts (voxel indices of
the file, :func:`medseg.prompts.files.load_prompts`; world prompts are converted there) are mapped onto the RAS grid
with the data's own permutation and flips (:meth:`medseg.prompts.geometry.Orientation.prompts`), and each object is
segmented by :func:`medseg.inference.prompted.segment_objects` (a box with ``k0 == k1`` on one slice; a 3-D box or
points by propagation), so an object prompted by one 2-D box gets the very mask the evaluation's ``predict_fn`` gives.

The slice axis is the run's own (an axis of the RAS grid, where the model was trained); ``--slice-axis`` cannot
change it. 3-D volumetric promptable runs (``spatial_dims == 3``) go to
:func:`medseg.inference.prompted_run_3d.predict_run_prompts_3d`, which replays their 3-D evaluation (min-max, zoom to
the training spacing, sliding windows with 3-D boxes and points) on the same prepared volume.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.data import MetaTensor

from medseg.errors import ConfigError, InputShapeError
from medseg.inference.cache import EmbeddingCache
from medseg.inference.loaded import LoadedModel
from medseg.inference.prepared import prepare_volume
from medseg.inference.prompted import PromptedResult, object_prompts, segment_objects
from medseg.inference.prompted_run_3d import predict_run_prompts_3d
from medseg.inference.recipe import SliceRecipe
from medseg.inference.run_settings import run_prompt_settings
from medseg.prompts.contract import Prompts
from medseg.prompts.files import ObjectPrompts

__all__ = ["RUN_RECIPE", "predict_run_prompts"]

RUN_RECIPE = SliceRecipe(intensity="none")  # the run's own transforms set intensities; slices are min-maxed


def predict_run_prompts(
    loaded: LoadedModel,
    image: MetaTensor,
    objects: Sequence[ObjectPrompts | Prompts],
    requested_axis: int | None = None,
    cache: EmbeddingCache | None = None,
    progress: bool = False,
) -> PromptedResult:
    """Segment the objects of a prompts file with a trained promptable run (module docstring).

    A 3-D run goes to :func:`medseg.inference.prompted_run_3d.predict_run_prompts_3d` (``requested_axis``, ``cache``
    and ``progress`` unused: it slides windows over the whole volume).

    Args:
        loaded: a promptable run (:func:`medseg.inference.sources.load_run`) or release with ``data.preprocess``.
        image: ``(1, X, Y, Z)`` MetaTensor as read, affine in RAS+ mm.
        objects: prompts in voxel indices of ``image`` (file array order).
        requested_axis: the ``--slice-axis`` asked for (file array axis); a note says so when the run's axis differs.
        cache: embedding cache shared across objects and cases.
        progress: progress bar over the slices of each propagation.

    Returns:
        :class:`~medseg.inference.prompted.PromptedResult` whose ``labels`` are in the file's array order and shape.

    Raises:
        ConfigError: a run config without preprocessing, or a model neither 2-D nor 3-D.
        InputShapeError: a multi-channel image for a 2-D run (the slice recipe reads one channel).
    """
    dims = int(getattr(loaded.model, "spatial_dims", 2))
    if dims == 3:
        return predict_run_prompts_3d(loaded, image, objects)
    if dims != 2:
        raise ConfigError(
            f"{loaded.source}: model.spatial_dims is {dims}; a promptable run is 2-D (model=promptable_2d) or 3-D "
            f"(model=promptable_3d). Check the run's config."
        )
    if image.shape[0] != 1:
        raise InputShapeError(
            f"{loaded.source} reads one-channel volumes slice by slice; this image has {image.shape[0]} channels (a 4D "
            f"file). Give one 3D volume."
        )
    settings = run_prompt_settings(loaded)
    volume = prepare_volume(image, settings.intensity)
    notes = []
    file_axis = volume.orientation.file_axis(settings.slice_axis)
    if requested_axis is not None and requested_axis != file_axis:
        notes.append(
            f"--slice-axis {requested_axis} not used: this run slices along its training axis, array axis "
            f"{file_axis} of this file (RAS axis {settings.slice_axis})"
        )
    oriented = [volume.orientation.prompts(object_prompts(obj)) for obj in objects]
    result = segment_objects(
        loaded.model, volume.image[0], oriented, recipe=RUN_RECIPE, slice_axis=settings.slice_axis, cache=cache,
        propagation=settings.propagation, progress=progress,
    )  # fmt: skip
    return PromptedResult(volume.native(result.labels), result.encoded, notes + result.ignored)
