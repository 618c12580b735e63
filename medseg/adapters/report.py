"""The trainable-parameter report: how much of the model trains, per group, as data and as a rich table.

Groups: ``backbone`` (the pretrained parameters of every :class:`~medseg.backbones.base.Backbone` in the model),
``adapters`` (parameters that adapters added: LoRA matrices, adapter layers, SSF scales, prompts) and ``head``
(everything outside the backbone: decoders, classifiers). A model without a ``Backbone`` (a bare encoder) counts all
its non-adapter parameters as ``backbone``. Percentages are of the total parameter count of the model, adapters
included; the same dictionary goes into run summaries.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from torch import nn

from medseg.adapters.targets import is_adapter_name
from medseg.backbones.base import Backbone
from medseg.console import wide_console

__all__ = ["GROUPS", "format_parameter_report", "parameter_report", "print_parameter_report"]

GROUPS = ("backbone", "adapters", "head")


def _backbone_prefixes(model: nn.Module) -> list[str] | None:
    prefixes = [name for name, module in model.named_modules() if isinstance(module, Backbone)]
    return prefixes or None


def _group(name: str, backbone_prefixes: list[str] | None) -> str:
    if is_adapter_name(name):
        return "adapters"
    if backbone_prefixes is None or "" in backbone_prefixes:
        return "backbone"
    if any(name.startswith(prefix + ".") for prefix in backbone_prefixes):
        return "backbone"
    return "head"


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts, overall and per group.

    Returns:
        ``{"trainable": int, "total": int, "trainable_percent": float, "methods": [...],
        "groups": {group: {"trainable": int, "total": int, "trainable_percent": float}}}``; a group's percentage is
        of the model total, so the groups' percentages add up to the overall one. ``methods`` are the adapter
        methods applied to the model (or its backbone), in order.
    """
    prefixes = _backbone_prefixes(model)
    groups = {g: {"trainable": 0, "total": 0} for g in GROUPS}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        group = groups[_group(name, prefixes)]
        group["total"] += param.numel()
        if param.requires_grad:
            group["trainable"] += param.numel()
    total = sum(g["total"] for g in groups.values())
    trainable = sum(g["trainable"] for g in groups.values())
    for group in groups.values():
        group["trainable_percent"] = 100.0 * group["trainable"] / total if total else 0.0
    methods: list[str] = []
    for module in model.modules():
        methods += [m for m in getattr(module, "_medseg_adapter_methods", []) if m not in methods]
    return {
        "trainable": trainable,
        "total": total,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "methods": methods,
        "groups": groups,
    }


def format_parameter_report(report: dict[str, Any], title: str | None = None):
    """A :class:`rich.table.Table` of a :func:`parameter_report`."""
    methods = ", ".join(report.get("methods") or []) or "none"
    table = Table(title=title or f"Trainable parameters (adapters: {methods})")
    for column in ("group", "trainable", "total", "% of model"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for name, group in report["groups"].items():
        if group["total"]:
            table.add_row(name, f"{group['trainable']:,}", f"{group['total']:,}", f"{group['trainable_percent']:.3f}")
    table.add_row("all", f"{report['trainable']:,}", f"{report['total']:,}", f"{report['trainable_percent']:.3f}")
    return table


def print_parameter_report(report: dict[str, Any], console=None) -> None:
    """Print a :func:`parameter_report` as a table (to ``console``, a :class:`rich.console.Console`)."""
    (console or wide_console()).print(format_parameter_report(report))
