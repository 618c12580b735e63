"""Prompts for promptable segmentation: the tensor contract, simulated clicks and boxes, coordinates and files.

- :mod:`medseg.prompts.contract`: :class:`Prompts`, the VISTA3D-style batch of points, boxes, classes, previous masks.
- :mod:`medseg.prompts.simulate`: clicks (SAM / DeepEdit rules, in mm) and boxes from reference masks (the reference);
  :mod:`~medseg.prompts.host_clicks` and :mod:`~medseg.prompts.device_clicks` give its correction clicks for a whole
  batch at once, with scipy on the host or as torch operations on the masks' device.
- :mod:`medseg.prompts.geometry`: every coordinate map: file voxel <-> world (RAS+ mm) <-> RAS-oriented grid <-> model
  input (a slice, the LiteMedSAM recipe's resized slice, a 3-D model's zoomed grid).
- :mod:`medseg.prompts.files`: the prompts JSON file of ``medseg predict --prompts``.
"""

from __future__ import annotations

from medseg.prompts.contract import PROMPT_KEYS, PromptError, Prompts, collate_prompts, pad_points
from medseg.prompts.files import ObjectPrompts, PromptFileError, dump_prompts, load_prompts, parse_prompts
from medseg.prompts.geometry import (
    box_voxel_to_world,
    from_model_input_2d,
    lps_to_ras,
    to_model_input_2d,
    voxel_to_world,
    world_box_to_voxel,
    world_to_voxel,
)
from medseg.prompts.simulate import (
    PROMPT_MIX,
    ClickSimulator,
    box_from_mask,
    interactive_loop,
    sample_object,
    sample_prompts,
)

__all__ = [
    "PROMPT_KEYS",
    "PROMPT_MIX",
    "ClickSimulator",
    "ObjectPrompts",
    "PromptError",
    "PromptFileError",
    "Prompts",
    "box_from_mask",
    "box_voxel_to_world",
    "collate_prompts",
    "dump_prompts",
    "from_model_input_2d",
    "interactive_loop",
    "load_prompts",
    "lps_to_ras",
    "pad_points",
    "parse_prompts",
    "sample_object",
    "sample_prompts",
    "to_model_input_2d",
    "voxel_to_world",
    "world_box_to_voxel",
    "world_to_voxel",
]
