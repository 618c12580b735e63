"""Finding, reading and strictly loading official checkpoints.

The weights of SAM, DINOv2 and MAE cannot ship with medseg; users download the official files. So every failure
here (file not found, truncated download, a DINOv2 file given to MAE) must say which file is expected, where to get it
and where to put it, and a pretrained request must never fall back to random weights.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from medseg.errors import WeightsError
from medseg.paths import ENV_WEIGHTS, weights_root

if TYPE_CHECKING:
    from medseg.backbones.registry import BackboneEntry

__all__ = [
    "COMMON_PREFIXES",
    "load_state_dict_strict",
    "read_checkpoint",
    "resolve_checkpoint",
    "sha256_file",
    "strip_prefixes",
]

COMMON_PREFIXES = ("module.", "model.", "encoder.")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB checkpoints do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_checkpoint(entry: BackboneEntry, checkpoint: str | Path | None) -> Path:
    """Path of the official checkpoint: explicit ``checkpoint``, else the family's locator, else ``$MEDSEG_WEIGHTS``."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"Checkpoint {path} for backbone '{entry.name}' does not exist. Expected the official file "
                f"'{entry.filename}' from {entry.url}."
            )
        return path
    if entry.locate is not None:
        return entry.locate()
    path = weights_root() / entry.filename
    if not path.is_file():
        raise WeightsError(
            f"Pretrained weights for '{entry.name}' not found: expected {path}. Download '{entry.filename}' from "
            f"{entry.url} and put it in {path.parent} (set by {ENV_WEIGHTS}), or pass checkpoint=PATH. "
            f"For a from-scratch twin use pretrained=False (config init=scratch)."
        )
    return path


def read_checkpoint(path: str | Path, unwrap: Iterable[str] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """Load a checkpoint with ``weights_only=True`` and return its flat state dict.

    Args:
        path: a ``.pth``/``.pt`` file (torch zip or legacy pickle) or a ``.safetensors`` file.
        unwrap: keys of a wrapping dict to descend into, e.g. MAE's ``{"model": state_dict}``.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: object = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise WeightsError(
            f"Cannot read checkpoint {path} ({size} bytes): {type(err).__name__}: {str(err).splitlines()[0][:200]}. "
            f"The file is probably truncated or corrupted (an interrupted download); download it again."
        ) from err
    for key in unwrap:
        if isinstance(data, Mapping) and key in data and isinstance(data[key], Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"Checkpoint {path} does not contain a state dict of tensors.")
    return dict(data)


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: Iterable[str] = COMMON_PREFIXES) -> dict:
    """Remove wrapper prefixes (``module.`` from DDP, ``model.``, ``encoder.``) shared by every key."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_state_dict_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, expected: str, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``module``; on mismatch raise an error that says which file, and which keys and shapes.

    Args:
        source: file the state came from, for the message.
        expected: what file was expected, e.g. ``"the official sam_vit_b_01ec64.pth"``.
        strict: raise on missing or unexpected keys; with ``False`` they are returned for the caller to report.

    Returns:
        ``(missing, unexpected)`` key lists.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):

        def _head(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        parts = [f"Checkpoint {source} does not match {module.__class__.__name__} (expected {expected})."]
        if missing:
            parts.append(f"Missing {len(missing)} keys: {_head(missing)}.")
        if unexpected:
            parts.append(f"Unexpected {len(unexpected)} keys: {_head(unexpected)}.")
        if mismatched:
            parts.append(f"Shape mismatches: {_head(mismatched)}.")
        parts.append("Is it the right file for this backbone and size?")
        raise WeightsError(" ".join(parts))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing, unexpected
