"""``-m MODEL`` of ``medseg predict`` and the napari widget: one dispatcher over every kind of model source.

A model comes from one of five places, each loaded by the stage that owns it, and every one returns a
:class:`~medseg.inference.loaded.LoadedModel`, so prediction never asks where a model came from:

- ``litemedsam``: the built-in zero-shot LiteMedSAM (:func:`medseg.inference.sources.load_litemedsam`).
- a run folder of ``medseg train``: rebuilt from its saved config and checkpoint (:func:`medseg.inference.sources.
  load_run`).
- a run folder of ``medseg classify``: :func:`medseg.inference.classified.load_classifier`.
- an official SAM 2.1 / MedSAM2 checkpoint file (``sam2.1_hiera_*.pt``, ``MedSAM2_latest.pt``): the whole ``SAM2Base``
  loaded strictly (:func:`medseg.inference.sources.load_sam2_file`), for memory propagation.
- a release folder, or a name the release registry knows: :mod:`medseg.release.load`.

The dispatcher sits in this stage because releases are a stage above inference.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medseg.errors import ConfigError
from medseg.inference.classified import load_classifier
from medseg.inference.loaded import LoadedModel
from medseg.inference.sources import (
    BUILTIN,
    is_classifier_folder,
    is_release_folder,
    is_run_folder,
    is_sam2_file,
    load_litemedsam,
    load_run,
    load_sam2_file,
    resolve_device,
)
from medseg.release.load import load_pretrained, load_release

__all__ = ["load_model"]


def load_model(
    spec: str | os.PathLike[str], device: str | torch.device | None = None, ckpt: str = "best"
) -> LoadedModel:
    """Load ``-m MODEL``: ``litemedsam``, a run folder, a SAM 2 / MedSAM2 ``.pt`` file, a release folder, or a name
    the release registry knows.

    Raises:
        ConfigError: a folder that is neither a run nor a release, or a name nobody knows.
        WeightsError: a ``.pt``/``.pth`` file that is not a whole SAM 2 / MedSAM2 model.
    """
    text = str(spec)
    if text in BUILTIN:
        return load_litemedsam(device)
    path = Path(text)
    if is_sam2_file(path):
        return load_sam2_file(path, device)
    if path.is_dir() and is_classifier_folder(path):
        return load_classifier(path, resolve_device(device))
    if path.is_dir() and is_run_folder(path):
        return load_run(path, device, ckpt)
    if path.is_dir() and not is_release_folder(path):
        raise ConfigError(
            f"-m {text} is a folder but neither a run folder (.hydra/config.yaml from `medseg train`) nor a release "
            f"folder (metadata.json + model.safetensors from `medseg export`)."
        )
    if path.is_dir():
        return load_release(path, resolve_device(device))
    return load_pretrained(text, resolve_device(device))
