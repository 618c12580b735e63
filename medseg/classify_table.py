"""The table ``medseg classify experiment=cls_quickstart`` prints: one row per (init, protocol) arm of the ladder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ladder_table"]


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ladder_table(summaries: Mapping[str, Mapping[str, Any]]) -> Any:
    """A rich table of the test metrics of each arm (``"init/protocol" -> summary.json``)."""
    from rich.table import Table

    first = next(iter(summaries.values()))
    table = Table(
        title=f"Test cases of {first.get('dataset', '?')} ({first['n_cases']} cases, {first['label_kind']} labels "
        f"{', '.join(first['labels'])})"
    )
    for column in ("init", "protocol", "AUROC", "accuracy", "bal. acc.", "kappa", "ECE", "trainable", "fit (s)"):
        table.add_column(column, justify="left" if column in ("init", "protocol") else "right")
    for arm, summary in summaries.items():
        init, protocol = arm.split("/", 1)
        mean = summary["mean"]
        table.add_row(
            init, protocol, _number(mean["auroc_macro"]), _number(mean["accuracy"]),
            _number(mean["balanced_accuracy"]), _number(mean["kappa"]), _number(mean["ece"]),
            f"{summary.get('trainable_params', 0):,}", _number(summary.get("fit_wall_time_s"), 0),
        )  # fmt: skip
    return table
