"""``frozen_dtype``: keep the frozen weights of an adapted backbone in bfloat16, the trained ones in float32.

In parameter-efficient fine-tuning nearly every weight is frozen. Kept in float32 they cost 4 bytes per parameter,
and under bf16 autocast every forward also makes (and caches) a bf16 copy of each of them. Stored in bfloat16 they
cost 2 bytes and need no copy, while what trains (adapters, unfrozen norms, heads) keeps float32 masters for the
optimiser. The weights of linear and convolution layers are converted (the bulk of the parameters; autocast casts
their inputs anyway); norms, embeddings, position tables and every buffer stay float32, which keeps the layers that
autocast does not cover (LayerNorm on CPU, BatchNorm statistics) exact.

Frozen weights rounded to bfloat16 stay rounded: outputs differ from the float32 model by bf16 rounding, as under
bf16 autocast. A :class:`~medseg.backbones.base.Backbone` whose weights are bf16 runs its forward under bf16
autocast by itself when its caller does not (e.g. CPU inference in fp32) and returns float32 outputs; any other
module refuses a forward without autocast with a one-line :class:`~medseg.errors.ConfigError`.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.adapters.targets import is_adapter_name
from medseg.errors import ConfigError

__all__ = ["FROZEN_DTYPES", "keep_frozen_in", "parse_frozen_dtype"]

#: Accepted values of ``frozen_dtype`` (``None``/``fp32``: no conversion).
FROZEN_DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_frozen_dtype(value: str | None) -> torch.dtype | None:
    """``torch.bfloat16`` for ``bf16``, ``None`` for ``fp32``/``None``; anything else is a :class:`ConfigError`."""
    if value is None:
        return None
    key = str(value).strip().lower()
    if key not in FROZEN_DTYPES:
        raise ConfigError(
            f"adapter.frozen_dtype must be bf16 or fp32 (or null), got {value!r}: bf16 keeps the frozen backbone "
            f"weights in bfloat16 (train with bf16 autocast, e.g. trainer.precision=bf16-mixed)."
        )
    return FROZEN_DTYPES[key]


class _RequireAutocast:
    """Forward pre-hook of a non-backbone module with bf16 weights: a float32 forward is a user error."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple) -> None:
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if tensor is not None and not torch.is_autocast_enabled(tensor.device.type):
            raise ConfigError(
                f"{type(module).__name__} keeps its frozen weights in {self.dtype} (adapter.frozen_dtype) and must "
                f"run under autocast: use trainer.precision=bf16-mixed / --precision bf16, or frozen_dtype: null."
            )


def keep_frozen_in(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Convert the frozen weights and biases of ``model``'s linear and convolution layers to ``dtype`` in place.

    The parameters stay the same objects (their data is replaced), so optimisers and hooks are unaffected. Modules
    added by adapters are left alone.

    Returns:
        The names of the converted parameters.
    """
    converted = []
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or is_adapter_name(module_name):
            continue
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
                converted.append(f"{module_name}.{name}" if module_name else name)
    if hasattr(type(model), "frozen_dtype"):  # a Backbone: it runs itself under autocast when needed
        model.frozen_dtype = dtype
    elif converted and not getattr(model, "_medseg_requires_autocast", False):
        model.register_forward_pre_hook(_RequireAutocast(dtype))
        model._medseg_requires_autocast = True
    return converted
