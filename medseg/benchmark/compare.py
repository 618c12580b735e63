"""From the per-case table to the benchmark's findings: per-arm means with CIs, paired comparisons, win/tie/loss.

Units and pairing: a value belongs to (arm, dataset, label fraction, seed, case). An arm's mean at one budget averages
its cases and seeds; its CI resamples *cases* (a block bootstrap: the seeds of one case share its image, so they are
not independent). Two arms are paired on (seed, case) -- the same training seed and test case -- and their
difference gets a block-bootstrap CI over cases; the Wilcoxon signed-rank test runs on the per-case differences
averaged over seeds (independent units). Holm's correction runs over every comparison of one metric (all pairs, datasets
and budgets): the family a reader scans for "any significant difference".

Which pairs (Jeong et al., arXiv 2411.08870; Isensee et al., arXiv 2404.09556):

* pretrained vs scratch: arms that differ only in ``init``;
* each adapter vs full fine-tuning: arms that differ only in ``adapter``, one of them ``full``;
* each arm vs the best CNN baseline at that dataset and budget (the baseline with the best primary-metric mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from medseg.benchmark.grid import Arm
from medseg.benchmark.stats import bootstrap_ci, higher_is_better, holm, paired_difference, verdict, wilcoxon_p

__all__ = [
    "COMPARISON_COLUMNS",
    "SUMMARY_COLUMNS",
    "arm_pairs",
    "comparisons_table",
    "summary_table",
    "win_tie_loss",
]

SUMMARY_COLUMNS = ["arm", "dataset", "label_fraction", "metric", "mean", "ci_low", "ci_high", "n", "n_values"]
COMPARISON_COLUMNS = [
    "arm_a", "arm_b", "kind", "dataset", "label_fraction", "metric", "mean_diff", "ci_low", "ci_high", "n",
    "p_value", "p_holm", "verdict",
]  # fmt: skip


def _stats_kwargs(statistics: dict[str, Any] | None) -> dict[str, Any]:
    s = dict(statistics or {})
    return {
        "confidence": float(s.get("confidence", 0.95)),
        "n_resamples": int(s.get("n_resamples", 10_000)),
        "method": str(s.get("method", "percentile")),
        "seed": int(s.get("seed", 0)),
    }


def summary_table(
    per_case: pd.DataFrame, metrics: Sequence[str], statistics: dict[str, Any] | None = None
) -> pd.DataFrame:
    """Mean and block-bootstrap CI (cases as blocks) per arm, dataset, label fraction and metric."""
    kwargs = _stats_kwargs(statistics)
    rows = []
    selected = per_case[per_case["metric"].isin(list(metrics))]
    for (arm, dataset, fraction, metric), group in selected.groupby(
        ["arm", "dataset", "label_fraction", "metric"], sort=False
    ):
        finite = group[np.isfinite(group["value"].to_numpy(dtype=float))]
        if finite.empty:
            continue
        interval = bootstrap_ci(finite["value"].to_numpy(float), groups=finite["case"].to_numpy(), **kwargs)
        rows.append({
            "arm": arm, "dataset": dataset, "label_fraction": fraction, "metric": metric, "mean": interval.estimate,
            "ci_low": interval.low, "ci_high": interval.high, "n": interval.n, "n_values": interval.n_values,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _differ_only_in(a: Arm, b: Arm, key: str) -> bool:
    if a.baseline or b.baseline or key not in a.factors or set(a.factors) != set(b.factors):
        return False
    return all((a.factors[k] == b.factors[k]) != (k == key) for k in a.factors)


def arm_pairs(arms: Sequence[Arm]) -> list[tuple[str, str, str]]:
    """``(arm_a, arm_b, kind)`` of the grid's comparisons (the baseline comparison is added per budget)."""
    pairs = []
    for a in arms:
        for b in arms:
            if _differ_only_in(a, b, "init") and a.factors["init"] == "pretrained" and b.factors["init"] == "scratch":
                pairs.append((a.name, b.name, "pretrained_vs_scratch"))
            if _differ_only_in(a, b, "adapter") and b.factors["adapter"] == "full":
                pairs.append((a.name, b.name, "adapter_vs_full"))
    return pairs


def best_baseline(summary: pd.DataFrame, arms: Sequence[Arm], dataset: str, fraction: float, metric: str) -> str | None:
    """The CNN baseline with the best mean ``metric`` at this dataset and budget (None without baselines)."""
    names = [a.name for a in arms if a.baseline]
    rows = summary[
        summary["arm"].isin(names) & (summary["dataset"] == dataset) & (summary["label_fraction"] == fraction)
        & (summary["metric"] == metric)
    ]  # fmt: skip
    if rows.empty:
        return None
    best = rows["mean"].idxmax() if higher_is_better(metric) else rows["mean"].idxmin()
    return str(rows.loc[best, "arm"])


def _compare(per_case: pd.DataFrame, a: str, b: str, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    keys = ["seed", "case"]
    paired = per_case[per_case["arm"] == a].merge(per_case[per_case["arm"] == b], on=keys, suffixes=("_a", "_b"))
    paired = paired[np.isfinite(paired["value_a"].to_numpy(float)) & np.isfinite(paired["value_b"].to_numpy(float))]
    if paired.empty:
        return None
    diff = paired["value_a"].to_numpy(float) - paired["value_b"].to_numpy(float)
    interval = paired_difference(paired["value_a"], paired["value_b"], groups=paired["case"].to_numpy(), **kwargs)
    per_case_diff = pd.Series(diff).groupby(paired["case"].to_numpy()).mean()
    return {
        "mean_diff": interval.estimate, "ci_low": interval.low, "ci_high": interval.high, "n": interval.n,
        "p_value": wilcoxon_p(per_case_diff.to_numpy()), "interval": interval,
    }  # fmt: skip


def comparisons_table(
    per_case: pd.DataFrame,
    arms: Sequence[Arm],
    metrics: Sequence[str],
    primary_metric: str,
    statistics: dict[str, Any] | None = None,
    summary: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Every comparison at every dataset and budget, with its CI, Wilcoxon p, Holm p (per metric) and verdict."""
    kwargs = _stats_kwargs(statistics)
    summary = summary if summary is not None else summary_table(per_case, [primary_metric], statistics)
    pairs = arm_pairs(arms)
    rows = []
    for (dataset, fraction), budget in per_case.groupby(["dataset", "label_fraction"], sort=True):
        present = set(budget["arm"])
        best = best_baseline(summary, arms, dataset, fraction, primary_metric)
        budget_pairs = [p for p in pairs if p[0] in present and p[1] in present]
        if best is not None:
            budget_pairs += [(a.name, best, "vs_best_baseline") for a in arms if a.name != best and a.name in present]
        for metric in metrics:
            values = budget[budget["metric"] == metric]
            for a, b, kind in budget_pairs:
                result = _compare(values, a, b, kwargs)
                if result is None:
                    continue
                interval = result.pop("interval")
                rows.append({
                    "arm_a": a, "arm_b": b, "kind": kind, "dataset": dataset, "label_fraction": fraction,
                    "metric": metric, **result, "verdict": verdict(interval, metric),
                })  # fmt: skip
    table = pd.DataFrame(rows, columns=[c for c in COMPARISON_COLUMNS if c != "p_holm"])
    table.insert(COMPARISON_COLUMNS.index("p_holm"), "p_holm", np.nan)
    for _, index in table.groupby("metric").groups.items():
        table.loc[index, "p_holm"] = holm(table.loc[index, "p_value"].to_numpy(float))
    return table[COMPARISON_COLUMNS]


def win_tie_loss(comparisons: pd.DataFrame) -> pd.DataFrame:
    """Counts of verdicts per (arm_a, arm_b, kind, metric) across datasets and budgets, as Jeong et al. report them."""
    columns = ["arm_a", "arm_b", "kind", "metric", "win", "tie", "loss"]
    if comparisons.empty:
        return pd.DataFrame(columns=columns)
    counts = (
        comparisons.groupby(["arm_a", "arm_b", "kind", "metric", "verdict"], sort=False).size().unstack(fill_value=0)
    )
    for verdict_name in ("win", "tie", "loss"):
        if verdict_name not in counts:
            counts[verdict_name] = 0
    return counts.reset_index()[columns]
