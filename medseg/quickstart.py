"""``medseg quickstart``: the command's entry point, nothing else.

What it runs (both arms, pretrained and scratch, then the table) is :func:`medseg.workflows.quickstart.run_quickstart`.
"""

from __future__ import annotations

from collections.abc import Sequence

from medseg.workflows.quickstart import run_quickstart

__all__ = ["main"]


def main(overrides: Sequence[str] = ()) -> int:
    """Run the quickstart with ``overrides`` (Hydra ``key=value``, passed to both arms' ``medseg train``); exit code."""
    return run_quickstart(overrides)
