"""Write a benchmark's folder from its finished runs: the CSV tables, the plots and ``report.md``.

Separate from the runner so that the outputs can be rebuilt from any set of finished runs (and tested from a
constructed per-case table) without training anything. CSV files are written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medseg.atomic import atomic_write_text
from medseg.benchmark.collect import PER_CASE_COLUMNS, cost_table, per_case_rows
from medseg.benchmark.compare import comparisons_table, summary_table
from medseg.benchmark.grid import BenchmarkSettings
from medseg.benchmark.plots import write_plots
from medseg.benchmark.report import write_report

__all__ = ["write_csv", "write_outputs", "write_tables"]


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """``frame`` as CSV (no index, NaN as an empty cell), written atomically."""
    return atomic_write_text(path, frame.to_csv(index=False, float_format="%.6g"))


def write_tables(
    output_dir: Path,
    settings: BenchmarkSettings,
    per_case: pd.DataFrame,
    cost: pd.DataFrame,
    facts: Mapping[str, Any],
    failures: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Path]:
    """From a per-case table and costs: summary, comparisons, plots and report (and the tables given)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = summary_table(per_case, settings.metrics, settings.statistics)
    comparisons = comparisons_table(
        per_case, settings.arms, settings.metrics, settings.primary_metric, settings.statistics, summary
    )
    paths = {
        "per_case.csv": write_csv(per_case[PER_CASE_COLUMNS], output_dir / "per_case.csv"),
        "summary.csv": write_csv(summary, output_dir / "summary.csv"),
        "comparisons.csv": write_csv(comparisons, output_dir / "comparisons.csv"),
        "cost.csv": write_csv(cost, output_dir / "cost.csv"),
    }
    for plot in write_plots(summary, cost, settings.primary_metric, output_dir):
        paths[plot.name] = plot
    report_facts = {
        "question": settings.question, "experiment": settings.experiment,
        "datasets": sorted(per_case["dataset"].unique()) if not per_case.empty else [],
        "arms": {arm.name: list(arm.overrides) for arm in settings.arms},
        "not_searched": {arm.name: "own learning rate" for arm in settings.arms if not arm.search},
        "label_fractions": settings.label_fractions, "seeds": settings.seeds, "lr_values": settings.lr_values,
        "search": {"label_fraction": settings.search_fraction, "seed": settings.search_seed,
                   "metric": settings.search_metric} if settings.searched else {"label_fraction": "-", "seed": "-",
                   "metric": "none (one candidate, no search)"},
        "n_test_cases": int(per_case["case"].nunique()) if not per_case.empty else 0,
        "metrics": settings.metrics, "primary_metric": settings.primary_metric, "statistics": settings.statistics,
        "limitations": settings.limitations, "alpha": float(settings.statistics.get("alpha", 0.05)),
        "nnunet_arms": [arm.name for arm in settings.arms if arm.nnunet], **facts,
    }  # fmt: skip
    paths["report.md"] = write_report(output_dir / "report.md", report_facts, summary, comparisons, cost, failures)
    return paths


def write_outputs(
    output_dir: Path,
    settings: BenchmarkSettings,
    finished: Sequence[Mapping[str, Any]],
    search_table: pd.DataFrame,
    failures: Sequence[Mapping[str, Any]],
    facts: Mapping[str, Any],
    compute: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Collect the finished final runs (``{"job", "summary", "record"}``) and write every output of the benchmark.

    ``compute``: per arm ``flops_per_step``, ``note`` and ``matched_by`` (the runner's count, for ``cost.csv``).
    """
    rows = []
    for run in finished:
        job = run["job"]
        rows += per_case_rows(run["summary"], job.arm, job.label_fraction, job.seed)
    per_case = pd.DataFrame(rows, columns=PER_CASE_COLUMNS)
    search_seconds: dict[str, float] = {}
    if not search_table.empty:
        search_seconds = search_table.groupby("arm")["wall_time_s"].sum(min_count=1).fillna(0.0).to_dict()
    cost = cost_table(
        [{"arm": r["job"].arm, "lr": r["job"].lr, "run_dir": output_dir / "runs" / r["job"].subdir,
          "summary": r["summary"], "job": r["record"]} for r in finished],
        search_seconds, compute,
    )  # fmt: skip
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = write_tables(output_dir, settings, per_case, cost, facts, failures)
    paths["lr_search.csv"] = write_csv(search_table, output_dir / "lr_search.csv")
    return paths
