"""An adapter-only release also in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

medseg's LoRA and DoRA are ``peft``'s own layers (:mod:`medseg.adapters.lora` injects them), so the same tensors load
with ``peft`` onto the base model medseg builds, without medseg's release loader::

    base = build_peft_base(read_release_config(folder), "lite_medsam.pth")   # medseg model, no adapters
    model = PeftModel.from_pretrained(base, folder).eval()                  # peft's own loading

PEFT's file names the LoRA tensors ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (DoRA adds
``lora_magnitude_vector``) and the modules trained in full (the decoder, everything outside the backbone) as
``modules_to_save``, stored under ``base_model.model.<module>.<tensor>``: the names ``peft``'s ``save_pretrained``
writes. The JSON holds only long-standing ``LoraConfig`` fields, so older and newer ``peft`` versions read it.

What PEFT cannot represent keeps medseg's format alone (:func:`peft_blocker` says why, and the card repeats it):
AdaptFormer, the 3-D adapter, SSF and VPT are not ``peft`` methods (``peft``'s IA3/prompt tuning differ from them);
BitFit, LayerNorm tuning and ``trainable`` patterns train parts of backbone layers, which ``modules_to_save`` can only
store as whole modules, clashing with LoRA on the same layers; several LoRA specs with different ranks are not one
``LoraConfig``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn

from medseg.atomic import atomic_path, atomic_write_text
from medseg.config import instantiate

__all__ = [
    "PEFT_CONFIG",
    "PEFT_METHODS",
    "PEFT_WEIGHTS",
    "build_peft_base",
    "peft_adapter",
    "peft_blocker",
    "write_peft_adapter",
]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
#: medseg adapter methods stored as ``peft`` LoRA (``lora_bonly`` is LoRA whose ``A`` did not train).
PEFT_METHODS = frozenset({"lora", "lora_bonly", "dora"})
_PREFIX = "base_model.model."
_LORA = (".lora_A.default.", ".lora_B.default.", ".lora_magnitude_vector.default.")


def _adapter_config(model: nn.Module) -> dict[str, Any]:
    return dict(getattr(getattr(model, "backbone", None), "_medseg_adapter_config", None) or {})


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if hasattr(module, "lora_A") and module.lora_A}


def peft_blocker(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``tensors`` (an adapter-only export of ``model``) cannot be written in PEFT's layout, or ``None``."""
    config = _adapter_config(model)
    methods = [str(spec.get("method")) for spec in config.get("methods", [])]
    other = sorted(set(methods) - PEFT_METHODS)
    if not methods or other:
        return (
            f"adapter method(s) {other or methods} have no peft equivalent (peft stores LoRA and DoRA; AdaptFormer, "
            f"adapter3d, SSF and VPT are medseg's own modules, BitFit/norm tuning trains parts of base layers)"
        )
    if config.get("trainable"):
        return f"trainable patterns {config['trainable']} train parts of the backbone, which peft's LoRA cannot store"
    if len(methods) > 1:
        return f"{len(methods)} LoRA specs {methods} are not one peft LoraConfig"
    layers = _lora_layers(model)
    for name in tensors:
        if name.startswith("backbone.") and not any(token in name for token in _LORA):
            return f"the backbone tensor {name} trained outside LoRA; peft's LoRA cannot store it"
        if "." not in name:
            return f"the model's own tensor {name!r} belongs to no module that peft could save"
    for name in _saved_modules(tensors):
        clash = [m for m, _ in model.named_modules() if m.endswith(name) and m != name and not m.startswith(name + ".")]
        if clash:
            return f"peft matches modules_to_save by name suffix, so {name!r} would also wrap {clash[:3]}"
    if len({(layer.r["default"], float(layer.lora_alpha["default"])) for layer in layers.values()}) > 1:
        return "the LoRA layers differ in rank or alpha"
    return None


def _saved_modules(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The top-level modules outside the backbone: stored whole, as peft's ``modules_to_save``."""
    return sorted({name.split(".", 1)[0] for name in tensors if not name.startswith("backbone.")})


def _peft_name(name: str) -> str:
    for token in _LORA:
        if token in name:
            head, tail = name.split(token)
            kind = token.split(".")[1]
            return f"{_PREFIX}{head}.{kind}" + ("" if kind == "lora_magnitude_vector" else f".{tail}")
    return _PREFIX + name


def peft_adapter(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], base_model: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json as a dict, tensors under PEFT's names)`` of an adapter-only export.

    Args:
        model: the adapted model the tensors come from (its LoRA layers give rank, alpha and DoRA).
        tensors: medseg's adapter-only tensors (:func:`medseg.release.weights.export_tensors`).
        base_model: the Hub id of the base model, or ``None`` (PEFT's ``base_model_name_or_path``).

    Raises:
        ValueError: :func:`peft_blocker` names a reason (call it first).
    """
    reason = peft_blocker(model, tensors)
    if reason is not None:
        raise ValueError(f"no PEFT layout for this release: {reason}")
    layers = _lora_layers(model)
    layer = next(iter(layers.values()))
    spec = _adapter_config(model)["methods"][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "r": int(layer.r["default"]),
        "lora_alpha": float(layer.lora_alpha["default"]),
        "lora_dropout": float(spec.get("dropout", 0.0)),
        "use_dora": bool(layer.use_dora["default"]),
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "target_modules": sorted(layers),
        "modules_to_save": _saved_modules(tensors),
    }
    return config, {_peft_name(k): v for k, v in tensors.items()}


def write_peft_adapter(
    folder: str | Path, model: nn.Module, tensors: Mapping[str, torch.Tensor], base_model: str | None
) -> list[str]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``; returns their names."""
    folder = Path(folder)
    config, renamed = peft_adapter(model, tensors, base_model)
    atomic_write_text(folder / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    with atomic_path(folder / PEFT_WEIGHTS) as temporary:
        save_file({k: v.contiguous() for k, v in renamed.items()}, str(temporary), metadata={"format": "pt"})
    (folder / PEFT_WEIGHTS).chmod(0o644)
    return [PEFT_CONFIG, PEFT_WEIGHTS]


def build_peft_base(config: DictConfig | Mapping[str, Any], base_weights: str | Path) -> nn.Module:
    """The model PEFT's files go onto: the release's architecture with the base weights and no adapter.

    Args:
        config: the release's ``config.yaml`` (:func:`medseg.release.spec.read_release_config`).
        base_weights: the base file named in ``weights.base`` (e.g. ``lite_medsam.pth``).
    """
    plain = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    model_cfg = {**plain["model"], "adapter": None, "pretrained": True, "checkpoint": str(base_weights)}
    return instantiate(OmegaConf.create(model_cfg)).eval()
