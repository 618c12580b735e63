"""``create_backbone`` / ``list_backbones``: one entry point for every family, in the spirit of ``timm.create_model``.

A family module registers a builder per name with :func:`register_backbone`. The builder receives the resolved
checkpoint path (or ``None`` for a scratch twin) and builds the same architecture either way, so a pretrained model and
its scratch twin differ only in their initial weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medseg.backbones.base import Backbone
from medseg.backbones.weights import resolve_checkpoint
from medseg.errors import ConfigError

__all__ = ["BackboneEntry", "create_backbone", "get_entry", "list_backbones", "register_backbone"]

# Modules imported lazily on the first registry lookup, so `import medseg` stays cheap.
_FAMILY_MODULES = (
    "medseg.backbones.sam",
    "medseg.backbones.litemedsam",
    "medseg.backbones.dinov2",
    "medseg.backbones.mae",
    "medseg.backbones.sam2",
)


@dataclass(frozen=True)
class BackboneEntry:
    """What the registry knows about one backbone name.

    Attributes:
        name: registry name.
        family: ``sam``, ``litemedsam``, ``dinov2`` or ``mae``.
        builder: ``builder(checkpoint: Path | None, **kwargs) -> Backbone``; ``checkpoint=None`` means scratch.
        filename: the official checkpoint file name users download (looked up in ``$MEDSEG_WEIGHTS``).
        url: where users get that file.
        locate: optional callable returning the checkpoint path without user action (LiteMedSAM ships its weights
            in a package); ``None`` for families whose weights the user supplies.
    """

    name: str
    family: str
    builder: Callable[..., Backbone]
    filename: str
    url: str
    locate: Callable[[], Path] | None = None


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(entry: BackboneEntry) -> BackboneEntry:
    """Add a backbone name; family modules call this at import time."""
    if entry.name in _REGISTRY and _REGISTRY[entry.name] != entry:
        raise ValueError(f"backbone {entry.name!r} is registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a missing third-party dependency, not a family not yet written
                raise


def list_backbones(family: str | None = None) -> list[str]:
    """Sorted registry names, optionally of one family."""
    _load_families()
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def get_entry(name: str) -> BackboneEntry:
    """The registry entry of ``name``, or an error listing the available names."""
    _load_families()
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown backbone {name!r}. Available: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def create_backbone(
    name: str,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    **kwargs,
) -> Backbone:
    """Build backbone ``name`` with official pretrained weights, or its from-scratch twin.

    Args:
        name: a name from :func:`list_backbones`.
        pretrained: load official weights; ``False`` builds the same architecture with its standard initialisation.
        checkpoint: explicit path to the official checkpoint file; otherwise the file is looked up in
            ``$MEDSEG_WEIGHTS`` (or located by the family, for LiteMedSAM). A pretrained request never falls back to
            random weights: a missing file raises :class:`~medseg.errors.WeightsError`.
        **kwargs: family options, e.g. ``in_channels``, ``channel_mode``, ``img_size``.
    """
    entry = get_entry(name)
    path = resolve_checkpoint(entry, checkpoint) if pretrained else None
    model = entry.builder(path, **kwargs)
    model.name = name
    return model
