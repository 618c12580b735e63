"""The release folder's layout and its ``config.yaml``: what rebuilds a model and its preprocessing, nothing else.

A release is a folder::

    model.safetensors   weights: the whole model (``merged``) or only what differs from the base (``adapter-only``)
    config.yaml         this module's format: builder arguments, preprocessing, inference settings, labels
    metadata.json       input format, labels, metrics, training data, licence (:mod:`medseg.release.metadata`)
    model_card.md       Hugging Face style card (:mod:`medseg.release.card`)
    example/            a small input and the output the model must give for it
    sha256sums.txt      SHA-256 of every other file (:mod:`medseg.release.checksums`)

``config.yaml`` is built from a run's saved Hydra config, reduced and resolved: interpolations are replaced by their
values, ``pixdim: median`` by the dataset's median spacing (mm), ``num_classes``/``in_channels`` are written into the
builder arguments, and no training-only group (loss, optimiser, sampling, augmentation, trainer) is kept. Every
``_target_`` in it must belong to :data:`ALLOWED_TARGETS`: building a model from a downloaded file must not call
arbitrary code, any more than loading a pickle should.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medseg.errors import ConfigError

__all__ = [
    "ALLOWED_TARGETS",
    "CONFIG",
    "EXAMPLE",
    "FORMAT",
    "METADATA",
    "MODEL_CARD",
    "MODES",
    "WEIGHTS",
    "check_targets",
    "read_release_config",
    "release_config",
]

FORMAT = "medseg-release/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
METADATA = "metadata.json"
MODEL_CARD = "model_card.md"
EXAMPLE = "example"
#: ``merged``: every tensor of the model; ``adapter-only``: adapters + trained parameters + decoder, on a named base.
MODES = ("merged", "adapter-only")
#: Prefixes a ``_target_`` in a release config may start with (exact names end without a dot).
ALLOWED_TARGETS = (
    "medseg.models.build_segmenter",
    "medseg.models.build_baseline",
    "medseg.adapters.AdapterConfig",
    "medseg.data.transforms.",
    "monai.transforms.",
)


def _resolved(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def release_config(
    run_cfg: DictConfig,
    *,
    name: str,
    version: str,
    mode: str,
    num_classes: int,
    in_channels: int,
    labels: Mapping[str, int],
    channels: Mapping[str, str],
    spacing: tuple[float, ...] | None,
    base: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The ``config.yaml`` of a release, from a run's saved config.

    Args:
        run_cfg: ``<run_dir>/.hydra/config.yaml``.
        name, version: release name and semantic version.
        mode: one of :data:`MODES`.
        num_classes, in_channels: from the run's dataset (the training code passes them to the builder).
        labels: ``{name: value}`` with background, from ``dataset.json``.
        channels: ``{index: name}`` (``dataset.json`` ``channel_names``).
        spacing: the resolved target spacing (mm, RAS order) that replaces ``pixdim: median``, or ``None``.
        base: for ``adapter-only``: ``{backbone, file, sha256, url}`` of the base weights; else ``None``.
    """
    if mode not in MODES:
        raise ConfigError(f"release mode must be one of {MODES}, got {mode!r}.")
    model = _resolved(run_cfg.model)
    model.update(num_classes=int(num_classes), in_channels=int(in_channels))
    if "checkpoint" in model:
        model["checkpoint"] = None  # a path on the training machine means nothing elsewhere: see ``weights.base``
    if "pretrained" in model:
        model["pretrained"] = mode == "adapter-only"
    transforms = []
    for transform in _resolved(run_cfg.data.preprocess.transforms):
        if str(transform.get("pixdim", "")) == "median":
            if spacing is None:
                raise ConfigError("the run's Spacingd uses pixdim 'median' but no dataset spacing was resolved.")
            transform = {**transform, "pixdim": [float(s) for s in spacing]}
        transforms.append(transform)
    inference = _resolved(run_cfg.task.inference)
    weights: dict[str, Any] = {"file": WEIGHTS, "mode": mode}
    if base is not None:
        weights["base"] = dict(base)
    config = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "kind": "dense",
        "weights": weights,
        "model": model,
        "data": {"preprocess": {"transforms": transforms}},
        "task": {"inference": inference},
        "labels": {str(k): int(v) for k, v in labels.items()},
        "channels": {str(k): str(v) for k, v in channels.items()},
    }
    check_targets(config, "the exported config")
    return config


def check_targets(config: Any, where: str) -> None:
    """Raise :class:`ConfigError` if any ``_target_`` in ``config`` is outside :data:`ALLOWED_TARGETS`."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            target = node.get("_target_")
            if target is not None and not any(
                str(target) == allowed or (allowed.endswith(".") and str(target).startswith(allowed))
                for allowed in ALLOWED_TARGETS
            ):
                raise ConfigError(
                    f"{where}: {path}._target_ = {target!r} is not allowed in a release (allowed: "
                    f"{', '.join(ALLOWED_TARGETS)}). A release only builds medseg models and MONAI/medseg transforms."
                )
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list | tuple):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")

    walk(config, "config")


def read_release_config(folder: str | Path) -> DictConfig:
    """Read and validate ``folder/config.yaml`` (format, required fields, allowed targets).

    Raises:
        ConfigError: not a medseg release config, a missing field, or a disallowed ``_target_``.
    """
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ConfigError(f"{path} not found: {folder} is not a medseg release folder (see `medseg export`).")
    config = OmegaConf.load(path)
    if not isinstance(config, DictConfig) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, DictConfig) else type(config).__name__
        raise ConfigError(f"{path}: format must be {FORMAT!r}, got {found!r}; is this a medseg release?")
    required = ("name", "version", "kind", "weights", "model", "data", "task", "labels")
    missing = [key for key in required if key not in config]
    if missing:
        raise ConfigError(f"{path} lacks {missing}; re-export the release with `medseg export`.")
    if config.weights.get("mode") not in MODES:
        raise ConfigError(f"{path}: weights.mode must be one of {MODES}, got {config.weights.get('mode')!r}.")
    if config.weights.mode == "adapter-only" and not config.weights.get("base"):
        raise ConfigError(f"{path}: an adapter-only release must name its base weights under weights.base.")
    check_targets(OmegaConf.to_container(config, resolve=False), str(path))
    return config
