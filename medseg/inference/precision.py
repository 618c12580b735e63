"""``--precision``: the numeric format inference runs in, and what it changes for the embedding cache.

``auto`` (the default) is ``bf16`` on a CUDA GPU that supports it (as nnU-Net uses autocast there) and ``fp32`` on
CPU. ``fp32`` runs the model as trained and as the official recipes do, so outputs match them bit for bit
where the recipe allows it. ``bf16`` runs matrix products and convolutions under :func:`torch.autocast` in bfloat16,
with the model's convolutions in channels-last memory format (oneDNN's fast layout for them). On a CPU with native
bfloat16 instructions (AVX512-BF16 or AMX) LiteMedSAM's TinyViT encoder then takes about half the time, and its
masks agree with fp32 ones to a Dice above 0.99 (``tools/bench_predict.py`` measures both). ``fp16`` is for CUDA
only (CPU float16 autocast is slow and poorly covered).

Embeddings computed in one format are not the embeddings of another, so :func:`numerics_signature` (the autocast
state of the current thread) is part of every embedding-cache key (:func:`medseg.inference.cache.embedding_key`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from medseg.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "check_precision",
    "inference_precision",
    "numerics_signature",
    "prepare_model",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_AUTOCAST_DEVICES = ("cpu", "cuda")

log = logging.getLogger("medseg.predict")


def check_precision(precision: str, device: str | torch.device) -> None:
    """Refuse a precision that does not exist or does not fit the device, before any work starts.

    Raises:
        ConfigError: an unknown name, or ``fp16`` on CPU.
    """
    device_type = torch.device(device).type
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; on CPU use bf16 (or fp32, the default).")
    if precision == "bf16" and device_type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("this CPU has no native bfloat16 instructions: --precision bf16 will be slower than fp32")


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` made concrete for ``device`` (``bf16`` on a bf16-capable GPU, else ``fp32``); others checked as is."""
    check_precision(precision, device)
    if precision != "auto":
        return precision
    cuda = torch.device(device).type == "cuda"
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


@contextlib.contextmanager
def inference_precision(precision: str, device: str | torch.device) -> Iterator[None]:
    """Autocast to ``precision`` on ``device`` for the duration of the block (``fp32``: nothing changes)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=_DTYPES[precision]):
        yield


def prepare_model(model: nn.Module, precision: str) -> nn.Module:
    """Channels-last weights for the reduced-precision path (in place); ``fp32`` leaves the model untouched."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    if resolve_precision(precision, device) != "fp32" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


def numerics_signature() -> str:
    """The current thread's autocast state, e.g. ``fp32`` or ``autocast=cpu:bfloat16`` (for cache keys)."""
    active = [
        f"{device}:{str(torch.get_autocast_dtype(device)).removeprefix('torch.')}"
        for device in _AUTOCAST_DEVICES
        if torch.is_autocast_enabled(device)
    ]
    return "autocast=" + ",".join(active) if active else "fp32"
