"""What a promptable run's config says about preparing and prompting it, as its interactive evaluation reads it.

``data.preprocess`` gives the intensity transforms and the training spacing (:mod:`medseg.inference.prepared`),
``task.inference`` the slice axis of a 2-D model and the sliding-window overlap of a 3-D one, and
``task.evaluation.propagation`` the carry and stop rules of slice propagation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from medseg.data.transforms import spacing_of
from medseg.errors import ConfigError
from medseg.inference.dense import preprocessing_of
from medseg.inference.loaded import LoadedModel
from medseg.inference.prepared import intensity_transforms
from medseg.inference.propagate import PropagationConfig

__all__ = ["RunPromptSettings", "config_section", "run_prompt_settings"]


@dataclass(frozen=True)
class RunPromptSettings:
    """How a promptable run is prepared and prompted.

    Attributes:
        slice_axis: RAS-grid axis the 2-D model slices along (``task.inference.slice_axis``, default 2).
        propagation: carry and stop rules of ``task.evaluation.propagation`` (defaults when absent or ``null``).
        overlap: sliding-window overlap of a 3-D model (``task.inference.overlap``, default 0.25).
        intensity: the run's intensity transforms (:func:`~medseg.inference.prepared.intensity_transforms`).
        target_spacing: the training grid's voxel size (mm, RAS order) from its ``Spacingd``; ``None`` without one.
    """

    slice_axis: int
    propagation: PropagationConfig
    overlap: float
    intensity: list[Callable]
    target_spacing: tuple[float, ...] | None


def config_section(config: Any, *keys: str) -> dict[str, Any]:
    """The mapping at ``config.<keys>`` as a plain dict (resolved); ``{}`` when a key is missing or ``null``."""
    node = config
    for key in keys:
        node = node.get(key) if node is not None and hasattr(node, "get") else None
    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return dict(node) if isinstance(node, Mapping) else {}


def run_prompt_settings(loaded: LoadedModel) -> RunPromptSettings:
    """The settings of a promptable run (or release), as its interactive evaluation uses them.

    Raises:
        ConfigError: a slice axis outside 0-2, unknown propagation keys (named in the message), or a config without
            preprocessing.
    """
    inference = config_section(loaded.config, "task", "inference")
    axis = inference.get("slice_axis")
    axis = 2 if axis is None else int(axis)
    if axis not in (0, 1, 2):
        raise ConfigError(f"{loaded.source}: task.inference.slice_axis must be 0, 1 or 2, got {axis}.")
    rules = config_section(loaded.config, "task", "evaluation").get("propagation") or {}
    rules = {k: v for k, v in dict(rules).items() if k != "axis"}
    try:
        propagation = PropagationConfig(axis=axis, **rules)
    except TypeError as err:
        raise ConfigError(
            f"{loaded.source}: task.evaluation.propagation {rules} does not fit PropagationConfig ({err}); remove the "
            f"unknown keys."
        ) from None
    preprocessing = preprocessing_of(loaded)
    overlap = float(inference.get("overlap", 0.25))
    return RunPromptSettings(axis, propagation, overlap, intensity_transforms(preprocessing), spacing_of(preprocessing))
