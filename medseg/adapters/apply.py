"""Apply an adapter config to a backbone: methods chosen by name, with options and target patterns, composed.

A config names one method with its options (``method: lora``, ``rank: 8``, ``targets: [qkv, proj]``) or several
(``methods: [{method: lora, rank: 8}, {method: norm}]``), plus optional ``trainable`` patterns of modules that train
in full (e.g. ``[neck]``). Applying it:

1. freezes every parameter of the model, unless a method is ``full``;
2. applies the methods in the order given, each unfreezing or adding its own parameters;
3. unfreezes the ``trainable`` patterns;
4. keeps frozen BatchNorms in evaluation mode (their running statistics stay the pretrained ones);
5. with ``frozen_dtype: bf16``, converts the frozen linear/convolution weights to bfloat16
   (:mod:`medseg.adapters.precision`).

Memory-lean options. ``frozen_dtype: bf16`` (top level) halves the frozen weights and removes autocast's copies;
``last_k_blocks: k`` (an option of every method but ``frozen``) puts the method in the last ``k`` transformer blocks
only, so the blocks below run without gradients and keep no activations (late adaptation).

The training module applies the config to the backbone right after building it, then builds the decoder (which
trains as usual) and reports the parameters of the whole model::

    adapter = medseg.config.instantiate(cfg.adapter)   # an AdapterConfig
    backbone = adapter(create_backbone(...))           # in place; returns the backbone
    model = Decoder(backbone, ...)
    report = parameter_report(model)                   # {"trainable": ..., "groups": {...}}

From the command line: ``adapter=lora adapter.rank=8``, ``adapter=lora_norm``, or ``adapter=frozen``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from medseg.adapters.adapter3d import apply_adapter3d
from medseg.adapters.adaptformer import apply_adaptformer
from medseg.adapters.bitfit import apply_bitfit, apply_norm
from medseg.adapters.freeze import apply_frozen, apply_full, freeze_all, freeze_batchnorm_statistics
from medseg.adapters.lora import apply_dora, apply_lora, apply_lora_bonly
from medseg.adapters.precision import keep_frozen_in, parse_frozen_dtype
from medseg.adapters.report import parameter_report
from medseg.adapters.ssf import apply_ssf
from medseg.adapters.targets import TargetError, iter_matching_parameters, module_name_summary
from medseg.adapters.vpt import apply_vpt
from medseg.errors import ConfigError

__all__ = ["METHODS", "AdapterConfig", "apply_adapters"]

#: Method name -> ``apply(model, **options) -> names of the parameters it made trainable``.
METHODS: dict[str, Callable[..., list[str]]] = {
    "full": apply_full,
    "frozen": apply_frozen,
    "bitfit": apply_bitfit,
    "norm": apply_norm,
    "lora": apply_lora,
    "lora_bonly": apply_lora_bonly,
    "dora": apply_dora,
    "adaptformer": apply_adaptformer,
    "adapter3d": apply_adapter3d,
    "ssf": apply_ssf,
    "vpt": apply_vpt,
}


def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) as plain lists and dicts."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check_options(method: str, options: Mapping[str, Any]) -> None:
    if method not in METHODS:
        raise ConfigError(f"Unknown adapter method {method!r}. Available: {', '.join(sorted(METHODS))}.")
    allowed = [p for p in inspect.signature(METHODS[method]).parameters if p != "model"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"adapter method {method!r} has no option(s) {unknown}; its options are: {', '.join(allowed) or 'none'}."
        )


class AdapterConfig:
    """A validated adapter config; calling it on a model applies it (Hydra ``_target_`` of ``conf/adapter/*``).

    Args:
        method: one method name (see :data:`METHODS`), whose options are the other keyword arguments; or
        methods: a list of ``{"method": name, **options}`` applied in order (composition), instead of ``method``.
        trainable: module name patterns trained in full in addition (e.g. ``["neck"]``).
        name: label used in run folder names and reports (default: the method names joined by ``+``).
        frozen_dtype: ``bf16`` keeps the frozen linear/convolution weights in bfloat16 (train under bf16 autocast);
            ``None``/``fp32`` leaves them in float32.
        **options: options of ``method``.

    Raises:
        ConfigError: unknown method or option, ``full``/``frozen`` combined with other methods, or neither
            ``method`` nor ``methods`` given.
    """

    def __init__(
        self,
        method: str | None = None,
        methods: Sequence[Mapping[str, Any]] | None = None,
        trainable: Sequence[str] = (),
        name: str | None = None,
        frozen_dtype: str | None = None,
        **options: Any,
    ) -> None:
        methods, options = _plain(methods), {k: _plain(v) for k, v in options.items()}
        parse_frozen_dtype(frozen_dtype)
        self.frozen_dtype = None if frozen_dtype is None else str(frozen_dtype)
        if (method is None) == (methods is None):
            raise ConfigError("An adapter config names either `method` (one) or `methods` (a list), not both/neither.")
        if method is not None:
            specs = [{"method": method, **options}]
        else:
            if options:
                raise ConfigError(f"With `methods:`, options go inside each method entry; got top-level {options}.")
            specs = [dict(s) for s in methods]
        for spec in specs:
            if "method" not in spec:
                raise ConfigError(f"adapter method entry {spec} has no `method` key.")
            _check_options(spec["method"], {k: v for k, v in spec.items() if k != "method"})
        names = [s["method"] for s in specs]
        if len(names) > 1 and {"full", "frozen"} & set(names):
            raise ConfigError(
                f"adapter methods {names}: 'full' and 'frozen' describe the whole backbone and do not combine with "
                f"other methods; to train a decoder on a frozen backbone use 'frozen' alone, to add e.g. LayerNorm "
                f"tuning to LoRA use methods [lora, norm]."
            )
        self.specs = specs
        self.trainable = list(_plain(trainable) or [])
        self.name = name or "+".join(names)

    @property
    def methods(self) -> list[str]:
        """The method names, in application order."""
        return [s["method"] for s in self.specs]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form, stored in adapter checkpoints; ``AdapterConfig.from_dict`` rebuilds it."""
        data = {"methods": [dict(s) for s in self.specs], "trainable": list(self.trainable), "name": self.name}
        if self.frozen_dtype is not None:
            data["frozen_dtype"] = self.frozen_dtype
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(
            methods=data["methods"], trainable=data.get("trainable", ()), name=data.get("name"),
            frozen_dtype=data.get("frozen_dtype"),
        )  # fmt: skip

    def __call__(self, model: nn.Module) -> nn.Module:
        """Apply to ``model`` in place and return it (see :func:`apply_adapters`), for use in builder chains."""
        apply_adapters(model, self)
        return model

    def apply(self, model: nn.Module) -> dict[str, Any]:
        """Apply to ``model`` in place and return the parameter report (see :func:`apply_adapters`)."""
        return apply_adapters(model, self)

    def __repr__(self) -> str:
        dtype = f", frozen_dtype={self.frozen_dtype!r}" if self.frozen_dtype is not None else ""
        return f"AdapterConfig(name={self.name!r}, methods={self.specs}, trainable={self.trainable}{dtype})"


def apply_adapters(model: nn.Module, config: AdapterConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Apply an adapter config to ``model`` (usually a backbone) in place.

    Args:
        model: the module to adapt; adapters attach to the transformer blocks and layers found inside it.
        config: an :class:`AdapterConfig`, or a mapping with its arguments (``{"method": "lora", "rank": 8}``).

    Returns:
        The :func:`~medseg.adapters.report.parameter_report` of ``model`` after adaptation, with ``"trained"``: the
        names of the parameters each method made trainable.

    Raises:
        ConfigError: the model already has adapters, or a method does not apply to it (a target pattern that
            matches nothing lists the model's module names).
    """
    if not isinstance(config, AdapterConfig):
        config = AdapterConfig(**dict(_plain(config)))
    if getattr(model, "_medseg_adapter_methods", None):
        raise ConfigError(
            f"{type(model).__name__} already has adapters {model._medseg_adapter_methods}; apply a config to a "
            f"freshly built backbone."
        )
    if "full" not in config.methods:
        freeze_all(model)
    trained: dict[str, list[str]] = {}
    for spec in config.specs:
        options = {k: v for k, v in spec.items() if k != "method"}
        trained[spec["method"]] = METHODS[spec["method"]](model, **options)
    if config.trainable:
        for pattern in config.trainable:
            if not iter_matching_parameters(model, [pattern]):
                raise TargetError(
                    f"trainable pattern {pattern!r} matches no module with parameters in {type(model).__name__}. "
                    f"Modules of this model:\n{module_name_summary(model)}"
                )
        extra = iter_matching_parameters(model, config.trainable)
        for _, param in extra:
            param.requires_grad_(True)
        trained["trainable"] = [n for n, _ in extra]
    freeze_batchnorm_statistics(model)
    dtype = parse_frozen_dtype(config.frozen_dtype)
    if dtype is not None:
        keep_frozen_in(model, dtype)
    model._medseg_adapter_methods = list(config.methods)
    model._medseg_adapter_config = config.to_dict()
    report = parameter_report(model)
    report["trained"] = trained
    return report
