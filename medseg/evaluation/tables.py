"""Results tables: one row per arm of a comparison, as the commands print them at the end of a run.

``medseg quickstart`` (pretrained vs scratch segmentation) and the classification ladder (``medseg classify
experiment=cls_quickstart``) each end with a table of their arms' ``summary.json`` numbers. They differ only in which
columns they read, so both build it here: the arm's name columns on the left, every number right-aligned and printed
by :func:`number` (missing values as ``n/a``). Print the table with :func:`medseg.console.wide_console` so that a pipe
or a log gets it whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.table import Table

__all__ = ["number", "results_table"]


def number(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or ``n/a`` when a metric is undefined (``None`` in ``summary.json``)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def results_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], name_columns: int = 1) -> Table:
    """A rich table of ``rows`` (already formatted cells) under ``columns``.

    Args:
        title: shown above the table (what was measured, on which cases).
        columns: column headers, the arm's name columns first.
        rows: one sequence of cells per arm, as many as ``columns``.
        name_columns: how many leading columns name the arm (left-aligned); the rest are numbers (right-aligned).
    """
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < name_columns else "right")
    for row in rows:
        table.add_row(*row)
    return table
