"""Benchmarks: a grid of arms trained with equal budgets and separate tuning, compared with honest statistics.

``medseg benchmark experiment=NAME`` runs :func:`medseg.benchmark.runner.run_benchmark`; :mod:`.stats` holds the
bootstrap, Wilcoxon and Holm code, :mod:`.compare` the per-arm and paired tables, :mod:`.report` and :mod:`.plots`
the outputs a person reads.
"""

from __future__ import annotations

__all__ = ["run_benchmark"]


def run_benchmark(overrides: list[str]) -> int:
    """See :func:`medseg.benchmark.runner.run_benchmark`."""
    # lazy: importing any benchmark module (stats, report) must not load the runner's training stack (torch, Hydra)
    from medseg.benchmark.runner import run_benchmark as run

    return run(overrides)
