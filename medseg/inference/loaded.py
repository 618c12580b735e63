"""``LoadedModel``: what every model source (run folder, release folder, built-in name) hands to inference.

``medseg predict``, ``medseg verify`` and the napari plugin meet models from three places: a run folder of
``medseg train`` (saved Hydra config + Lightning checkpoint), a release folder (``model.safetensors`` +
``config.yaml``, :mod:`medseg.release`) and the built-in zero-shot ``litemedsam``. Each loader rebuilds the model and
returns this one record, so the code that preprocesses, predicts and writes files never asks where a model came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from medseg.errors import ConfigError

__all__ = ["MODEL_KINDS", "LoadedModel"]

MODEL_KINDS = ("dense", "promptable", "classifier")


@dataclass
class LoadedModel:
    """A model ready for inference, with everything needed to feed it and to name its outputs.

    Attributes:
        model: the network in eval mode on its device (a ``Segmenter``/baseline for ``dense``, a
            ``PromptableSegmenter`` or volumetric promptable model for ``promptable``, a classifier).
        kind: one of :data:`MODEL_KINDS`; ``promptable`` models need a prompts file, the others none.
        config: the run's composed config, reduced to what inference needs: ``model`` (builder arguments),
            ``data.preprocess`` (deterministic transforms, the same as in training), ``task.inference`` (roi size,
            overlap, slice axis). Empty for the built-in ``litemedsam``, which follows its own fixed recipe.
        label_names: ``{label value: name}`` including background 0 (from the dataset's ``dataset.json``).
        source: a short human description of where the model came from (shown in progress and errors).
        weights_id: a stable hash of the weights (for embedding-cache keys and model cards).
    """

    model: nn.Module
    kind: str
    config: DictConfig = field(default_factory=lambda: OmegaConf.create({}))
    label_names: dict[int, str] = field(default_factory=dict)
    source: str = ""
    weights_id: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"LoadedModel.kind must be one of {MODEL_KINDS}, got {self.kind!r}")
