"""Releases of trained models: export, checksums, verification, and loading by folder or by name.

A release is a folder with ``model.safetensors``, ``config.yaml``, ``metadata.json``, ``model_card.md`` (and the same
card as ``README.md`` for the Hub, :mod:`medseg.release.hub`), ``sha256sums.txt``, ``example/`` and, for adapter-only
LoRA/DoRA releases, PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``
(:mod:`medseg.release.peft_adapter`); see :mod:`medseg.release.spec`. ``medseg export`` writes one from a run
(:func:`export_release`), ``medseg verify`` checks one (:func:`verify_release`), and :func:`load_pretrained` /
:func:`load_release` rebuild its model offline, safetensors only, after checking every checksum. Names are looked up
in ``registry.yaml`` (:mod:`medseg.release.registry`).

Submodules are imported on first use, so ``import medseg.release`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ChecksumError",
    "export_release",
    "fetch_release",
    "load_pretrained",
    "load_release",
    "run_export",
    "run_verify",
    "verify_checksums",
    "verify_release",
]

_WHERE = {
    "ChecksumError": "checksums",
    "verify_checksums": "checksums",
    "export_release": "export",
    "run_export": "export",
    "fetch_release": "registry",
    "load_pretrained": "load",
    "load_release": "load",
    "run_verify": "verify",
    "verify_release": "verify",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"medseg.release.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'medseg.release' has no attribute {name!r}")
