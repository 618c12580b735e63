"""Finding, reading and strictly loading checkpoints: official backbone files and the runs' Lightning checkpoints.

The weights of SAM, DINOv2 and MAE cannot ship with medseg; users download the official files. So every failure
here (file not found, truncated download, a DINOv2 file given to MAE) must say which file is expected, where to get it
and where to put it, and a pretrained request must never fall back to random weights.

No checkpoint is ever unpickled: a ``.pth``/``.ckpt`` is a pickle, and a pickle can run any code while it loads. Every
file goes through :func:`load_checkpoint`, i.e. ``torch.load(weights_only=True)``, which builds only tensors and
plain containers. Lightning checkpoints written before training stopped saving MONAI objects hold a few more (a
``MetaTensor`` as ``ModelCheckpoint``'s best score, with NumPy arrays and MONAI enum values in its meta data): they are
rebuilt as inert stand-ins (:data:`CHECKPOINT_SAFE_GLOBALS`), since medseg only reads the ``state_dict``.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from medseg.errors import WeightsError
from medseg.paths import ENV_WEIGHTS, weights_root

if TYPE_CHECKING:
    from medseg.backbones.registry import BackboneEntry

__all__ = [
    "CHECKPOINT_SAFE_GLOBALS",
    "COMMON_PREFIXES",
    "load_checkpoint",
    "load_state_dict_strict",
    "read_checkpoint",
    "read_lightning_state",
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


class _InertTensor(torch.Tensor):
    """Stand-in for ``monai.data.meta_tensor.MetaTensor`` in old checkpoints: a tensor, its meta data kept as plain
    attributes, no MONAI code run while loading."""


def _enum_value(value: Any) -> Any:
    """Stand-in for MONAI's string enums (``MetaKeys``, ``TraceKeys``, ``SpaceKeys``): their plain value."""
    return value


_NUMPY_CORE = getattr(np, "_core", None) or np.core
#: What ``torch.load(weights_only=True)`` may build beyond tensors and plain containers, all data without behaviour:
#: NumPy arrays of numeric dtypes (``ModelCheckpoint`` scores' meta data, RNG states), MONAI's ``MetaTensor`` and enum
#: values as the inert stand-ins above. Nothing here can open a file, import a module or call a function by name.
CHECKPOINT_SAFE_GLOBALS: list[Any] = [
    (_InertTensor, "monai.data.meta_tensor.MetaTensor"),
    *[(_enum_value, f"monai.utils.enums.{name}") for name in ("MetaKeys", "TraceKeys", "SpaceKeys")],
    _NUMPY_CORE.multiarray._reconstruct,
    (_NUMPY_CORE.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),  # written by NumPy 1
    np.ndarray,
    np.dtype,
    *sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefd"}, key=lambda t: t.__name__),
]
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")
_REASON = re.compile(r"Unsupported [^.\n]*")


def load_checkpoint(
    path: str | Path, what: str = "checkpoint", fix: str = "an interrupted download or copy; get it again"
) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with :data:`CHECKPOINT_SAFE_GLOBALS` and one-line errors.

    Args:
        path: a ``.pth``/``.pt``/``.ckpt`` file (torch zip or legacy format).
        what: how the file is named in messages, e.g. ``"checkpoint"``.
        fix: the likely cause of a truncated file and its remedy, for the message.

    Raises:
        WeightsError: the file holds Python objects other than tensors and plain data (a pickle that would run code
            if unpickled: refused before anything in it runs), or it is truncated, corrupted or no torch file.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": the refusal below says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises whatever its readers hit on arbitrary bytes (KeyError included)
        size = path.stat().st_size if path.is_file() else 0
        text = str(err)
        if "Weights only load failed" in text:
            found, reason = _GLOBAL.search(text), _REASON.search(text)
            if found:
                detail = f"it holds pickled Python objects ({found.group(1) or found.group(2)}) that would run code"
            else:
                detail = f"its pickle is not one torch.save writes for tensors ({reason.group(0) if reason else '?'})"
            raise WeightsError(
                f"{what} {path} is not a plain-weights checkpoint: {detail}, so it was refused unread. medseg loads "
                f"only tensors; use a checkpoint written by `medseg train` or an official weights file."
            ) from None
        if isinstance(err, FileNotFoundError | IsADirectoryError | PermissionError):
            raise WeightsError(f"Cannot read {what} {path}: {err.strerror or err}.") from None
        first = re.split(r"(?<=\.)\s", text.strip().splitlines()[0])[0][:200].rstrip(".") if text.strip() else ""
        raise WeightsError(
            f"Cannot read {what} {path} ({size} bytes): {type(err).__name__}{': ' + first if first else ''}. The "
            f"file is probably truncated or corrupted ({fix})."
        ) from None


def read_checkpoint(path: str | Path, unwrap: Iterable[str] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """Load an official checkpoint with :func:`load_checkpoint` and return its flat state dict.

    Args:
        path: a ``.pth``/``.pt`` file (torch zip or legacy pickle) or a ``.safetensors`` file.
        unwrap: keys of a wrapping dict to descend into, e.g. MAE's ``{"model": state_dict}``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            data: object = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            size = path.stat().st_size if path.exists() else 0
            raise WeightsError(
                f"Cannot read checkpoint {path} ({size} bytes): {type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}. The file is probably truncated or corrupted (an interrupted "
                f"download); download it again."
            ) from None
    else:
        data = load_checkpoint(path)
    for key in unwrap:
        if isinstance(data, Mapping) and key in data and isinstance(data[key], Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"Checkpoint {path} does not contain a state dict of tensors.")
    return dict(data)


def read_lightning_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint of ``medseg train`` (keys as the task names them: ``model.*``).

    Old checkpoints (a ``MetaTensor`` in the callbacks' state) and new ones load alike; see the module docstring.

    Raises:
        WeightsError: not a plain-weights checkpoint, unreadable, or without a ``state_dict`` of tensors.
    """
    state = load_checkpoint(path, fix="a run killed while saving, or a full disk; use another checkpoint of the run")
    weights = state.get("state_dict") if isinstance(state, Mapping) else None
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise WeightsError(
            f"{path} is not a Lightning checkpoint of `medseg train` (no 'state_dict' of tensors); give a run "
            f"folder's checkpoints/best*.ckpt or last.ckpt."
        )
    return {str(k): v for k, v in weights.items()}


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
