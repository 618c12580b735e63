"""Every coordinate mapping of medseg, in one place: file voxel <-> world <-> RAS-oriented grid <-> model input.

A prompt (or a prediction) crosses these spaces in this order, and each step has one home:

==========================  ===============================================  ==========================================
step                        what                                             where
==========================  ===============================================  ==========================================
file voxel <-> world        ``A @ [i, j, k, 1]``, RAS+ mm; DICOM LPS; world  :mod:`~medseg.prompts.geometry.world`
                            boxes; a resampled grid through the world
file voxel <-> RAS grid     axis permutation and flips, no interpolation     :mod:`~medseg.prompts.geometry.orientation`
file slice <-> RAS slice    a slice index, its 2-D prompts and masks, for    :mod:`~medseg.prompts.geometry.slicing`
                            the interactive sessions
RAS grid -> model input     a slice's 2-D prompts; the 2-D model's resized   :mod:`~medseg.prompts.geometry.model_input`
                            slice (pixel centres, or the LiteMedSAM recipe);
                            the 3-D model's zoomed grid
==========================  ===============================================  ==========================================

Integer coordinates name voxel centres; coordinates are in array order (never SAM's ``(x, y)``).
"""

from __future__ import annotations

from medseg.prompts.geometry.model_input import (
    SliceGeometry,
    box_to_model_input_2d,
    from_model_input_2d,
    prompts_on_slice,
    slice_box,
    to_model_input_2d,
    to_recipe_input,
    zoom_prompts,
)
from medseg.prompts.geometry.orientation import Orientation
from medseg.prompts.geometry.slicing import SliceOrientation
from medseg.prompts.geometry.world import (
    box_voxel_to_world,
    check_inside,
    lps_to_ras,
    lps_to_ras_affine,
    model_input_to_voxel,
    ras_to_lps,
    voxel_spacing,
    voxel_to_model_input,
    voxel_to_world,
    world_box_to_voxel,
    world_to_voxel,
)

__all__ = [
    "Orientation",
    "SliceGeometry",
    "SliceOrientation",
    "box_to_model_input_2d",
    "box_voxel_to_world",
    "check_inside",
    "from_model_input_2d",
    "lps_to_ras",
    "lps_to_ras_affine",
    "model_input_to_voxel",
    "prompts_on_slice",
    "ras_to_lps",
    "slice_box",
    "to_model_input_2d",
    "to_recipe_input",
    "voxel_spacing",
    "voxel_to_model_input",
    "voxel_to_world",
    "world_box_to_voxel",
    "world_to_voxel",
    "zoom_prompts",
]
