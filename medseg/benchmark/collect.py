"""Read the finished runs of a benchmark into long tables: metrics per case (``per_case.csv``) and costs (``cost.csv``).

``summary.json`` is read through :func:`medseg.evaluation.read_summary`. Per case, each metric is written per class
(``dice/grey_matter``) and as the mean over the foreground classes (``dice``), the per-case counterpart of the
summary's ``foreground_mean`` (HD95 skips classes where it is undefined; NaN when it is undefined for all). When a
summary has an ``interactive`` section (promptable runs), its per-case means are added too: ``dice_click1``...
``dice_click10``, ``noc85``, ``noc90``, ``box_dice``, ``propagation_dice``.

Time is a per-case row too: ``seconds``, the evaluation time of the case (load, predict, invert, write, score;
:mod:`medseg.evaluation.timing`), where the summary records it. ``cost.csv`` gives each arm's
``eval_seconds_per_case``: the evaluation's wall time per test case, set-up included (the summary's
``seconds_per_case``, or ``eval_wall_time_s / n_cases`` for summaries written before it existed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from medseg.evaluation.metrics import METRICS
from medseg.evaluation.summary import interactive_per_case

__all__ = ["COST_COLUMNS", "PER_CASE_COLUMNS", "SECONDS", "cost_table", "per_case_rows"]

PER_CASE_COLUMNS = ["arm", "dataset", "label_fraction", "seed", "case", "metric", "value"]
COST_COLUMNS = [
    "arm", "trainable_params", "total_params", "trainable_percent", "peak_rss_mb", "peak_gpu_memory_mb",
    "train_wall_time_s", "eval_wall_time_s", "eval_seconds_per_case", "steps", "samples_per_step", "train_steps_per_s",
    "train_samples_per_s", "n_runs", "lr", "search_wall_time_s",
]  # fmt: skip
_INTERACTIVE = ("noc85", "noc90", "box_dice", "propagation_dice")
SECONDS = "seconds"  # the per-case metric row of a case's evaluation time


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def per_case_rows(summary: Mapping[str, Any], arm: str, label_fraction: float, seed: int) -> list[dict[str, Any]]:
    """The long-format rows of one run's ``summary.json`` (see :data:`PER_CASE_COLUMNS`)."""
    dataset = str(summary.get("dataset", "?"))
    base = {"arm": arm, "dataset": dataset, "label_fraction": float(label_fraction), "seed": int(seed)}
    rows = []
    for case in summary["metric_per_case"]:
        case_id = str(case.get("case_id", "?"))
        per_class = case["metrics"]
        for metric in METRICS:
            values = []
            for name, scores in per_class.items():
                value = _number(scores.get(metric))
                values.append(value)
                rows.append({**base, "case": case_id, "metric": f"{metric}/{name}", "value": value})
            finite = [v for v in values if math.isfinite(v)]
            rows.append(
                {**base, "case": case_id, "metric": metric, "value": float(np.mean(finite)) if finite else math.nan}
            )
        if math.isfinite(_number(case.get(SECONDS))):
            rows.append({**base, "case": case_id, "metric": SECONDS, "value": float(case[SECONDS])})
    if summary.get("interactive") is not None:
        for case_id, means in interactive_per_case(summary).items():
            values = {f"dice_click{k}": dice for k, dice in enumerate(means.get("dice_at_k") or (), start=1)}
            values.update({metric: means[metric] for metric in _INTERACTIVE if metric in means})
            rows.extend({**base, "case": str(case_id), "metric": m, "value": _number(v)} for m, v in values.items())
    return rows


def _samples_per_step(run_dir: Path) -> float:
    """Training images per optimisation step (volumes per batch x slices or patches per volume), from the run config."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return math.nan
    cfg = OmegaConf.load(path)
    batch = OmegaConf.select(cfg, "data.batch_size", default=None)
    samples = OmegaConf.select(cfg, "data.sampling.num_samples", default=1)
    try:
        return float(int(batch) * int(samples or 1))
    except (TypeError, ValueError):
        return math.nan


def _seconds_per_case(summary: Mapping[str, Any]) -> float:
    """Evaluation wall time per test case: the summary's ``seconds_per_case``, else wall time over ``n_cases``."""
    recorded = _number(summary.get("seconds_per_case"))
    if math.isfinite(recorded):
        return recorded
    wall, cases = _number(summary.get("eval_wall_time_s")), _number(summary.get("n_cases"))
    return wall / cases if cases > 0 else math.nan


def cost_table(runs: Iterable[Mapping[str, Any]], search_seconds: Mapping[str, float] | None = None) -> pd.DataFrame:
    """One row per arm: parameters, peak memory (MB), mean wall times (s) per run, throughput, chosen lr.

    Args:
        runs: one mapping per finished final run with ``arm``, ``lr``, ``run_dir``, ``summary`` (the summary.json
            dictionary) and ``job`` (its ``job.json`` record, or ``None``).
        search_seconds: total wall time (s) of each arm's learning-rate search.
    """
    per_run = []
    for run in runs:
        summary, job = run["summary"], run.get("job") or {}
        train_s = _number(summary.get("train_wall_time_s"))
        steps = _number(summary.get("steps_trained"))
        per_step = _samples_per_step(Path(run["run_dir"]))
        peak = _number(job.get("peak_rss_mb"))
        per_run.append({
            "arm": run["arm"], "lr": float(run["lr"]),
            "trainable_params": _number(summary.get("trainable_params")),
            "total_params": _number(summary.get("total_params")),
            "trainable_percent": _number(summary.get("trainable_percent")),
            "peak_rss_mb": peak if math.isfinite(peak) else _number(summary.get("peak_rss_mb")),
            "peak_gpu_memory_mb": _number(summary.get("peak_gpu_memory_mb")),
            "train_wall_time_s": train_s, "eval_wall_time_s": _number(summary.get("eval_wall_time_s")),
            "eval_seconds_per_case": _seconds_per_case(summary),
            "steps": steps, "samples_per_step": per_step,
            "train_steps_per_s": steps / train_s if train_s > 0 else math.nan,
            "train_samples_per_s": steps * per_step / train_s if train_s > 0 else math.nan,
        })  # fmt: skip
    if not per_run:
        return pd.DataFrame(columns=COST_COLUMNS)
    frame = pd.DataFrame(per_run)
    table = frame.groupby("arm", sort=False).agg(
        trainable_params=("trainable_params", "first"), total_params=("total_params", "first"),
        trainable_percent=("trainable_percent", "first"), peak_rss_mb=("peak_rss_mb", "max"),
        peak_gpu_memory_mb=("peak_gpu_memory_mb", "max"), train_wall_time_s=("train_wall_time_s", "mean"),
        eval_wall_time_s=("eval_wall_time_s", "mean"), eval_seconds_per_case=("eval_seconds_per_case", "mean"),
        steps=("steps", "first"),
        samples_per_step=("samples_per_step", "first"), train_steps_per_s=("train_steps_per_s", "mean"),
        train_samples_per_s=("train_samples_per_s", "mean"), n_runs=("lr", "size"), lr=("lr", "first"),
    ).reset_index()  # fmt: skip
    table["search_wall_time_s"] = table["arm"].map(lambda a: (search_seconds or {}).get(a, 0.0))
    return table[COST_COLUMNS]
