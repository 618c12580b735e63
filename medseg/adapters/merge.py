"""Merge adapters into the base weights for inference, and save/load adapter-only checkpoints for releases.

Merging. LoRA/DoRA (``peft``'s own ``merge``/``unmerge`` of each LoRA layer) and SSF (folded into the preceding
linear or LayerNorm, :mod:`medseg.adapters.ssf`) are linear in the layer's output and merge exactly, up to float
rounding. AdaptFormer, the 3-D adapter and visual prompts are non-linear or change the token sequence: they stay as
they are. :func:`merge_adapters` returns which layers it merged so callers can tell.

Adapter-only checkpoints. A fine-tuned model differs from its pretrained base only in the tensors an adapter added
and the base parameters a method trained (biases for ``bitfit``, LayerNorms for ``norm``). :func:`save_adapter`
writes exactly those tensors to a safetensors file, with the adapter config in the file's metadata;
:func:`load_adapter` applies that config to a freshly built base model (when it has no adapters yet) and loads the
tensors strictly, so a release ships kilobytes to megabytes instead of the whole backbone.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from medseg.adapters.apply import AdapterConfig, apply_adapters
from medseg.adapters.ssf import merge_ssf, unmerge_ssf
from medseg.adapters.targets import is_adapter_name
from medseg.errors import WeightsError

__all__ = [
    "ADAPTER_FORMAT",
    "adapter_state_dict",
    "load_adapter",
    "merge_adapters",
    "read_adapter_metadata",
    "save_adapter",
    "unmerge_adapters",
]

ADAPTER_FORMAT = "medseg-adapter/1"


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer  # lazy: peft costs ~3 s to import; only LoRA/DoRA models need it

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merge_adapters(model: nn.Module) -> list[str]:
    """Fold LoRA/DoRA updates and SSF scales into the base weights; returns the names of the merged layers.

    The model keeps its structure (merged layers skip their adapter branch), so :func:`unmerge_adapters` restores
    the trainable form.
    """
    merged = []
    for name, layer in _lora_layers(model):
        if not layer.merged:
            layer.merge(safe_merge=True)
            merged.append(name)
    return merged + merge_ssf(model)


@torch.no_grad()
def unmerge_adapters(model: nn.Module) -> list[str]:
    """Undo :func:`merge_adapters`; returns the names of the unmerged layers."""
    unmerged = []
    for name, layer in _lora_layers(model):
        if layer.merged:
            while layer.merged:
                layer.unmerge()
            unmerged.append(name)
    return unmerged + unmerge_ssf(model)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that distinguish the adapted model from its base: adapter tensors and trainable parameters.

    Adapter tensors include frozen ones (the random ``lora_A`` of ``lora_bonly``) and persistent buffers (the
    AdaptFormer scale), since a fresh build cannot reproduce them.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {
        name: tensor.detach()
        for name, tensor in model.state_dict().items()
        if name in trainable or is_adapter_name(name)
    }


def save_adapter(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write :func:`adapter_state_dict` to a safetensors file (atomically), with the adapter config as metadata.

    Merged layers are unmerged first, so the file always holds the trainable form.

    Args:
        model: an adapted model (see :func:`~medseg.adapters.apply.apply_adapters`).
        path: the ``.safetensors`` file to write.
        metadata: extra string entries for the file header (e.g. the base backbone name).
    """
    unmerge_adapters(model)
    config = getattr(model, "_medseg_adapter_config", None)
    header = {"format": ADAPTER_FORMAT, **(metadata or {})}
    if config is not None:
        header["adapter_config"] = json.dumps(config)
    tensors = {k: v.contiguous().clone() for k, v in adapter_state_dict(model).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_adapter_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of an adapter file (``format``, ``adapter_config`` as JSON, ...)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter file onto ``model``: a freshly built base (the config is applied first) or an adapted one.

    Raises:
        WeightsError: the file is not a medseg adapter file, or its tensors do not fit the model exactly (missing,
            unexpected or differently shaped tensors are all listed).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Adapter file {path} does not exist.")
    meta = read_adapter_metadata(path)
    if meta.get("format") != ADAPTER_FORMAT:
        raise WeightsError(f"{path} is not a medseg adapter file (format {meta.get('format')!r}).")
    if not getattr(model, "_medseg_adapter_methods", None):
        if "adapter_config" not in meta:
            raise WeightsError(f"{path} has no adapter config; apply the config to the model before loading.")
        apply_adapters(model, AdapterConfig.from_dict(json.loads(meta["adapter_config"])))
    tensors = load_file(str(path), device="cpu")
    expected = adapter_state_dict(model)
    own = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = sorted(k for k in set(tensors) & set(own) if tensors[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise WeightsError(
            f"Adapter file {path} does not fit {type(model).__name__}: missing {missing[:10]}, unexpected "
            f"{unexpected[:10]}, shape mismatch {shapes[:10]}. Load it onto the backbone it was trained on."
        )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return model
