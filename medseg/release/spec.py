"""The release folder's layout and its ``config.yaml``: what rebuilds a model and its preprocessing, nothing else.

A release is a folder::

    model.safetensors   weights: the whole model (``merged``) or only what differs from the base (``adapter-only``)
    config.yaml         this module's format: builder arguments, preprocessing, inference settings, labels
    metadata.json       input format, labels, metrics, training data, licence (:mod:`medseg.release.metadata`)
    model_card.md       Hugging Face style card (:mod:`medseg.release.card`)
    README.md           the same card, under the name the Hugging Face Hub shows (:mod:`medseg.release.hub`)
    adapter_config.json, adapter_model.safetensors
                        adapter-only LoRA/DoRA releases: the adapter in PEFT's layout (:mod:`.peft_adapter`)
    example/            a small input and the output the model must give for it
    sha256sums.txt      SHA-256 of every other file (:mod:`medseg.release.checksums`)

``config.yaml`` is built from a run's saved Hydra config, reduced and resolved: interpolations are replaced by their
values, ``pixdim: median`` by the dataset's median spacing (mm), ``num_classes``/``in_channels`` are written into the
builder arguments, and no training-only group (loss, optimiser, sampling, augmentation, trainer) is kept.

Building a model from a downloaded file must not call arbitrary code, any more than loading a pickle should. Hydra
imports whatever a ``_target_`` names, walking module attributes (``medseg.data.transforms.torch.load`` *is*
``torch.load``), so :func:`read_release_config` reads the file with YAML's safe loader, refuses every interpolation
but a plain ``${path.to.key}`` reference (a resolver such as ``oc.decode`` builds values the check never sees),
resolves the references, and only then requires every ``_target_`` (in dicts, lists, ``_args_``, at any depth) to be
one of the exact strings in :data:`ALLOWED_TARGETS`, and every other ``_key_`` to be one of Hydra's harmless
:data:`HYDRA_KEYS`. What it returns is that resolved, checked config, so what is built is what was checked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medseg.errors import ConfigError

__all__ = [
    "ALLOWED_TARGETS",
    "CONFIG",
    "EXAMPLE",
    "FORMAT",
    "HYDRA_KEYS",
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
#: Every ``_target_`` a release config may name, as exact strings (no prefixes: a prefix admits every attribute
#: reachable from the module, ``os`` and ``builtins`` included): the model builders of ``conf/model/*.yaml`` and
#: the deterministic preprocessing of ``conf/data/preprocess/*.yaml``, plus MONAI's common deterministic transforms.
_MONAI_TRANSFORMS = (
    "Orientationd", "Spacingd", "CropForegroundd", "EnsureTyped", "EnsureChannelFirstd", "CastToTyped",
    "ScaleIntensityRanged", "ScaleIntensityRangePercentilesd", "ScaleIntensityd", "NormalizeIntensityd",
    "ThresholdIntensityd", "SpatialPadd", "DivisiblePadd", "CenterSpatialCropd", "Resized",
)  # fmt: skip
ALLOWED_TARGETS = frozenset(
    {
        "medseg.models.build_segmenter",
        "medseg.models.build_baseline",
        "medseg.adapters.AdapterConfig",
        "medseg.data.transforms.CTWindowd",
        "medseg.data.transforms.ForegroundZScored",
        "medseg.data.transforms.above",
        *(f"monai.transforms.{name}" for name in _MONAI_TRANSFORMS),
    }
)
#: The other ``_key_`` entries Hydra's ``instantiate`` honours; all only shape how an allowed target is called.
HYDRA_KEYS = frozenset({"_target_", "_args_", "_partial_", "_convert_", "_recursive_"})
_PLAIN_REFERENCE = re.compile(r"\$\{[\w.\[\]-]+\}")
_SPECIAL_KEY = re.compile(r"^_.*_$")


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
    layout: str | None = None,
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
        layout: for ``merged``: ``plain`` (adapters merged away: the config builds the model without them) or
            ``adapters`` (:func:`medseg.release.weights.merged_layout`).
    """
    if mode not in MODES:
        raise ConfigError(f"release mode must be one of {MODES}, got {mode!r}.")
    model = _resolved(run_cfg.model)
    model.update(num_classes=int(num_classes), in_channels=int(in_channels))
    if "checkpoint" in model:
        model["checkpoint"] = None  # a path on the training machine means nothing elsewhere: see ``weights.base``
    if "pretrained" in model:
        model["pretrained"] = mode == "adapter-only"
    if layout not in (None, "plain", "adapters"):
        raise ConfigError(f"merged layout must be 'plain' or 'adapters', got {layout!r}.")
    if mode == "merged" and layout == "plain" and "adapter" in model:
        model["adapter"] = None  # merged into the base weights: the architecture has no adapter modules
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
    if mode == "merged" and layout is not None:
        weights["layout"] = layout
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
    """Raise :class:`ConfigError` if a ``_target_`` is not in :data:`ALLOWED_TARGETS` or a ``_key_`` not in
    :data:`HYDRA_KEYS`, anywhere in ``config`` (plain containers, interpolations already resolved)."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for key in node:
                if isinstance(key, str) and _SPECIAL_KEY.match(key) and key not in HYDRA_KEYS:
                    raise ConfigError(
                        f"{where}: {path}.{key} is not allowed in a release: of Hydra's special keys only "
                        f"{', '.join(sorted(HYDRA_KEYS))} may appear. Re-export the release with `medseg export`."
                    )
            target = node.get("_target_")
            if "_target_" in node and (not isinstance(target, str) or target not in ALLOWED_TARGETS):
                raise ConfigError(
                    f"{where}: {path}._target_ = {target!r} is not allowed in a release. A release only builds medseg "
                    f"models and the exact MONAI/medseg transforms listed in medseg.release.spec.ALLOWED_TARGETS."
                )
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list | tuple):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")

    walk(config, "config")


def _check_interpolations(node: Any, where: str, path: str = "config", resolved: bool = False) -> None:
    """Refuse resolvers and nested interpolations (before resolution) and any ``${`` left after it."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            _check_interpolations(value, where, f"{path}.{key}", resolved)
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            _check_interpolations(value, where, f"{path}[{index}]", resolved)
    elif isinstance(node, str) and "${" in (node if resolved else _PLAIN_REFERENCE.sub("", node)):
        raise ConfigError(
            f"{where}: {path} = {node[:80]!r} is not allowed in a release: only plain ${{path.to.key}} references may "
            f"appear, no resolvers (oc.decode, oc.env, ...) or nested or escaped interpolations. Re-export the release."
        )


def read_release_config(folder: str | Path) -> DictConfig:
    """Read and validate ``folder/config.yaml``: safe YAML, format, required fields, interpolations, allowed targets.

    Returns:
        The config with its references resolved, exactly as checked (no interpolation is left to resolve later).

    Raises:
        ConfigError: not YAML (or a ``!!python/...`` tag), not a medseg release config, a missing field, a resolver,
            or a disallowed ``_target_``/special key.
    """
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ConfigError(f"{path} not found: {folder} is not a medseg release folder (see `medseg export`).")
    try:  # OmegaConf's loader is PyYAML's SafeLoader: a python/object tag has no constructor and is an error
        config = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"{path}{where}: not a plain YAML release config ({problem}); python/... tags and other non-data YAML are "
            f"refused. Re-export or re-download the release."
        ) from None
    except (OmegaConfBaseException, UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"{path}: cannot be read as a release config ({str(err).splitlines()[0]}).") from None
    if not isinstance(config, DictConfig) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, DictConfig) else type(config).__name__
        raise ConfigError(f"{path}: format must be {FORMAT!r}, got {found!r}; is this a medseg release?")
    _check_interpolations(OmegaConf.to_container(config, resolve=False), str(path))
    try:
        plain = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: an interpolation does not resolve ({str(err).splitlines()[0]}).") from None
    _check_interpolations(plain, str(path), resolved=True)
    check_targets(plain, str(path))
    config = OmegaConf.create(plain)
    required = ("name", "version", "kind", "weights", "model", "data", "task", "labels")
    missing = [key for key in required if key not in config]
    if missing:
        raise ConfigError(f"{path} lacks {missing}; re-export the release with `medseg export`.")
    if not isinstance(config.weights, DictConfig) or config.weights.get("mode") not in MODES:
        mode = config.weights.get("mode") if isinstance(config.weights, DictConfig) else config.weights
        raise ConfigError(f"{path}: weights.mode must be one of {MODES}, got {mode!r}.")
    if config.weights.mode == "adapter-only" and not config.weights.get("base"):
        raise ConfigError(f"{path}: an adapter-only release must name its base weights under weights.base.")
    return config
