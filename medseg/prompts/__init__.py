"""Prompts for promptable segmentation: the tensor contract, simulated clicks and boxes, coordinates and files.

- :mod:`medseg.prompts.contract`: :class:`Prompts`, the VISTA3D-style batch of points, boxes, classes, previous masks.
- :mod:`medseg.prompts.simulate`: clicks (SAM / DeepEdit rules, in mm) and boxes from reference masks.
"""

from __future__ import annotations

from medseg.prompts.contract import PROMPT_KEYS, PromptError, Prompts, collate_prompts, pad_points
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
    "PromptError",
    "Prompts",
    "box_from_mask",
    "collate_prompts",
    "interactive_loop",
    "pad_points",
    "sample_object",
    "sample_prompts",
]
