"""Which modules a method acts on: name patterns, their resolution, and the error when a pattern matches nothing.

A pattern is matched against the dotted module names of the model an adapter config is applied to (usually the
backbone, e.g. ``image_encoder.blocks.3.attn.qkv`` for SAM or ``vit.blocks.3.attn.qkv`` for DINOv2/MAE):

* a plain name matches a whole suffix of dotted components: ``qkv`` and ``attn.qkv`` both match
  ``vit.blocks.3.attn.qkv``, but ``kv`` does not;
* a pattern with glob characters (``*``, ``?``, ``[``) is matched with :func:`fnmatch.fnmatchcase` against the full
  name, with or without any leading prefix (``blocks.1[01].attn.qkv``, ``*norm*``);
* a match that is a container (``mlp``, ``attn``) stands for the modules of the method's type inside it, so ``mlp``
  means ``mlp.lin1``/``mlp.lin2`` on SAM, ``mlp.fc1``/``mlp.fc2`` on the timm ViTs and TinyViT, and
  ``mlp.layers.0``/``mlp.layers.1`` on SAM 2's Hiera.

On Hiera (``image_encoder.trunk.blocks.N``), ``proj`` matches the attention output ``attn.proj`` and also the
shortcut projection ``blocks.N.proj`` that widens the first block of each stage (``nn.Linear`` too); write
``attn.proj`` for the attention projection alone.

Modules that adapters added (``lora_A``, ``adapter3d``...) are never targets, and a peft LoRA layer stands for the
original layer it wraps, so methods compose in any order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from medseg.errors import ConfigError

__all__ = [
    "ADAPTER_NAME_TOKENS",
    "TargetError",
    "in_scope",
    "is_adapter_name",
    "iter_matching_parameters",
    "module_name_summary",
    "resolve_targets",
]

#: Substrings that mark a parameter or module as added by an adapter (used by the report and the adapter checkpoint).
ADAPTER_NAME_TOKENS = ("lora_", "adaptformer", "adapter3d", "ssf_", "vpt_")

_GLOB = re.compile(r"[*?\[]")
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


class TargetError(ConfigError):
    """A target pattern of an adapter config matches no module of the right type."""


def is_adapter_name(name: str) -> bool:
    """Whether a dotted parameter/module name belongs to something an adapter added."""
    return any(token in part for part in name.split(".") for token in ADAPTER_NAME_TOKENS)


def _pattern_matches(pattern: str, name: str) -> bool:
    if _GLOB.search(pattern):
        return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)
    return name == pattern or name.endswith("." + pattern)


def _base_of(module: nn.Module) -> nn.Module:
    """The original layer behind a peft tuner layer (``lora.Linear.base_layer``), else the module itself."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def module_name_summary(model: nn.Module, types: tuple[type[nn.Module], ...] | None = None, limit: int = 40) -> str:
    """The model's module names with block indices collapsed to ``*``, for error messages.

    ``image_encoder.blocks.0.attn.qkv`` ... ``image_encoder.blocks.11.attn.qkv`` become one line
    ``image_encoder.blocks.*.attn.qkv (Linear)``, so a user sees the patterns they could write.
    """
    seen: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not name or is_adapter_name(name) or (types is not None and not isinstance(module, types)):
            continue
        kinds = seen.setdefault(_INDEX.sub("*", name), [])
        if type(module).__name__ not in kinds:
            kinds.append(type(module).__name__)
    lines = [f"  {pattern} ({', '.join(kinds)})" for pattern, kinds in seen.items()]
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def resolve_targets(
    model: nn.Module,
    patterns: Sequence[str] | str,
    types: tuple[type[nn.Module], ...],
    method: str,
) -> dict[str, nn.Module]:
    """Modules of ``types`` that the patterns designate, by dotted name, in model order.

    Args:
        model: the module an adapter config is applied to.
        patterns: name patterns (see the module docstring); a single string is one pattern.
        types: module classes the method can act on (``nn.Linear`` for LoRA; ``nn.Linear``/``nn.LayerNorm`` for SSF).
        method: the method's name, for the error message.

    Raises:
        TargetError: a pattern designates no module of ``types``; the message lists the model's module names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise TargetError(f"{method}: no target patterns given; name the modules to adapt, e.g. targets=[qkv].")
    named = [(n, m) for n, m in model.named_modules() if n and not is_adapter_name(n)]
    found: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits: dict[str, nn.Module] = {}
        for name, module in named:
            if not _pattern_matches(pattern, name):
                continue
            if isinstance(_base_of(module), types):
                hits[name] = module
                continue
            for sub, child in module.named_modules(prefix=name):  # a container: its modules of the right type
                if sub != name and not is_adapter_name(sub) and isinstance(child, types):
                    hits[sub] = child
        if not hits:
            kinds = "/".join(t.__name__ for t in types)
            raise TargetError(
                f"{method}: target pattern {pattern!r} matches no {kinds} module of {type(model).__name__}. "
                f"Patterns match dotted name suffixes ('qkv', 'attn.proj', 'mlp') or globs ('blocks.1*.attn.qkv'). "
                f"Modules of this model ({kinds} marked where applicable):\n{module_name_summary(model)}"
            )
        found.update(hits)
    order = {name: i for i, (name, _) in enumerate(named)}
    # a module nested in a peft layer (base_layer) is reported under the peft layer's name
    return {n: found[n] for n in sorted(found, key=lambda n: order.get(n, len(order)))}


def iter_matching_parameters(model: nn.Module, patterns: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    """Parameters inside a module (or named) as one of ``patterns`` says, e.g. ``neck`` or ``*.bias``."""
    out = []
    patterns = list(patterns)
    for name, param in model.named_parameters():
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(_pattern_matches(p, prefix) for p in patterns for prefix in prefixes):
            out.append((name, param))
    return out


def in_scope(names: Sequence[str], sites: Sequence | None, patterns: Sequence[str] | str, method: str) -> list[str]:
    """The ``names`` that lie inside the block ``sites`` of late adaptation (all of them when ``sites`` is ``None``).

    Raises:
        TargetError: none of them does; the message names the blocks and the patterns.
    """
    if sites is None:
        return list(names)
    inside = [n for n in names if any(n == s.name or n.startswith(s.name + ".") for s in sites)]
    if not inside:
        raise TargetError(
            f"{method}: target patterns {list(patterns) if not isinstance(patterns, str) else [patterns]} match "
            f"nothing inside the last {len(sites)} block(s) ({sites[0].name} ... {sites[-1].name}) chosen by "
            f"last_k_blocks; target modules of the blocks (qkv, proj, mlp) or raise last_k_blocks."
        )
    return inside
