"""From the per-case table to the benchmark's findings: per-arm means with CIs, paired comparisons, win/tie/loss.

Units and pairing: a value belongs to (arm, dataset, label fraction, seed, case). An arm's mean at one budget averages
its cases and seeds; its CI resamples *cases* (a block bootstrap: the seeds of one case share its image, so they are
not independent). Two arms are paired on (seed, case) -- the same training seed and test case -- and their
difference gets a block-bootstrap CI over cases; the Wilcoxon signed-rank test runs on the per-case differences
averaged over seeds (independent units). Holm's correction runs over every comparison of one metric (all pairs, datasets
and budgets): the family a reader scans for "any significant difference".

Verdict (:func:`medseg.benchmark.stats.decide`, issue 19's rule): ``win`` iff the paired CI excludes 0 in arm a's
favour **and** the Holm-corrected Wilcoxon p is below ``statistics.alpha`` (0.05), ``loss`` in the reverse case, ``tie``
otherwise; ``ci_verdict`` keeps the CI half alone. :func:`win_tie_loss` counts them per question, dataset and budget.

Which pairs (the questions; Jeong et al., arXiv 2411.08870; Isensee et al., arXiv 2404.09556):

* ``pretrained_vs_scratch``: arms that differ only in ``init`` (one pair per adapter);
* ``adapter_vs_full``: arms that differ only in ``adapter``, one of them ``full``;
* ``vs_nnunet``: every other arm (CNN baselines included) against each nnU-Net arm (``+nnunet=...``);
* ``vs_best_baseline``: each arm vs the best CNN baseline at that dataset and budget (the non-nnU-Net baseline with
  the best primary-metric mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from medseg.benchmark.grid import Arm
from medseg.benchmark.stats import bootstrap_ci, decide, higher_is_better, holm, paired_difference, verdict, wilcoxon_p

__all__ = [
    "COMPARISON_COLUMNS",
    "QUESTIONS",
    "SUMMARY_COLUMNS",
    "WTL_COLUMNS",
    "arm_pairs",
    "best_baseline",
    "comparisons_table",
    "summary_table",
    "win_tie_loss",
]

SUMMARY_COLUMNS = ["arm", "dataset", "label_fraction", "metric", "mean", "ci_low", "ci_high", "n", "n_values"]
COMPARISON_COLUMNS = [
    "arm_a", "arm_b", "kind", "dataset", "label_fraction", "metric", "mean_diff", "ci_low", "ci_high", "n",
    "p_value", "p_holm", "ci_verdict", "verdict",
]  # fmt: skip
QUESTIONS = {  # kind -> the question in words (report.md)
    "pretrained_vs_scratch": "pretrained vs scratch (same adapter)",
    "adapter_vs_full": "adapter vs full fine-tuning (same init)",
    "vs_nnunet": "arm vs nnU-Net",
    "vs_best_baseline": "arm vs best CNN baseline",
}
WTL_COLUMNS = ["kind", "dataset", "label_fraction", "metric", "win", "tie", "loss", "n"]


def _stats_kwargs(statistics: dict[str, Any] | None) -> dict[str, Any]:
    s = dict(statistics or {})
    return {
        "confidence": float(s.get("confidence", 0.95)),
        "n_resamples": int(s.get("n_resamples", 10_000)),
        "method": str(s.get("method", "percentile")),
        "seed": int(s.get("seed", 0)),
    }


def _alpha(statistics: dict[str, Any] | None) -> float:
    return float((statistics or {}).get("alpha", 0.05))


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
    """``(arm_a, arm_b, kind)`` of the grid's comparisons and each arm vs nnU-Net (the best CNN baseline comparison
    is added per budget)."""
    pairs = []
    for a in arms:
        for b in arms:
            if _differ_only_in(a, b, "init") and a.factors["init"] == "pretrained" and b.factors["init"] == "scratch":
                pairs.append((a.name, b.name, "pretrained_vs_scratch"))
            if _differ_only_in(a, b, "adapter") and b.factors["adapter"] == "full":
                pairs.append((a.name, b.name, "adapter_vs_full"))
    for b in arms:
        if b.nnunet:
            pairs += [(a.name, b.name, "vs_nnunet") for a in arms if not a.nnunet]
    return pairs


def best_baseline(summary: pd.DataFrame, arms: Sequence[Arm], dataset: str, fraction: float, metric: str) -> str | None:
    """The CNN baseline (nnU-Net arms aside: they have their own question) with the best mean ``metric`` at this
    dataset and budget (None without one)."""
    names = [a.name for a in arms if a.baseline and not a.nnunet]
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
    """Every comparison at every dataset and budget, with its CI, Wilcoxon p, Holm p (per metric) and verdicts (see
    the module doc: ``verdict`` needs the CI and the Holm p; ``ci_verdict`` is the CI alone)."""
    kwargs = _stats_kwargs(statistics)
    summary = summary if summary is not None else summary_table(per_case, [primary_metric], statistics)
    pairs = arm_pairs(arms)
    rows: list[dict[str, Any]] = []
    intervals: list[Any] = []
    for (dataset, fraction), budget in per_case.groupby(["dataset", "label_fraction"], sort=True):
        present = set(budget["arm"])
        best = best_baseline(summary, arms, dataset, fraction, primary_metric)
        budget_pairs = [p for p in pairs if p[0] in present and p[1] in present]
        if best is not None:
            budget_pairs += [
                (a.name, best, "vs_best_baseline")
                for a in arms
                if a.name != best and a.name in present and not a.nnunet
            ]
        for metric in metrics:
            values = budget[budget["metric"] == metric]
            for a, b, kind in budget_pairs:
                result = _compare(values, a, b, kwargs)
                if result is None:
                    continue
                intervals.append(result.pop("interval"))
                rows.append({
                    "arm_a": a, "arm_b": b, "kind": kind, "dataset": dataset, "label_fraction": fraction,
                    "metric": metric, **result, "ci_verdict": verdict(intervals[-1], metric),
                })  # fmt: skip
    return _decide(pd.DataFrame(rows, columns=COMPARISON_COLUMNS[:-1]), intervals, _alpha(statistics))


def _decide(table: pd.DataFrame, intervals: Sequence[Any], alpha: float) -> pd.DataFrame:
    """Holm over each metric's family, then the verdict of each row under both criteria."""
    table = table.copy()
    for _, index in table.groupby("metric").groups.items():
        table.loc[index, "p_holm"] = holm(table.loc[index, "p_value"].to_numpy(float))
    table["verdict"] = [
        decide(interval, float(p), str(metric), alpha)
        for interval, p, metric in zip(intervals, table["p_holm"], table["metric"])
    ]
    return table[COMPARISON_COLUMNS]


def win_tie_loss(
    comparisons: pd.DataFrame,
    by: Sequence[str] = ("kind", "dataset", "label_fraction", "metric"),
    metric: str | None = None,
) -> pd.DataFrame:
    """Counts of verdicts (``win``/``tie``/``loss`` of arm a, and ``n``) per group of comparisons.

    Args:
        comparisons: ``comparisons.csv``'s table.
        by: the grouping; by default per question (``kind``), dataset, label budget and metric, as issue 19 and
            Jeong et al. summarise a study; ``("arm_a", "arm_b", "kind", "metric")`` counts each pair across budgets.
        metric: only this metric's comparisons (``None``: all).
    """
    by = list(by)
    columns = [*by, "win", "tie", "loss", "n"]
    if metric is not None and not comparisons.empty:
        comparisons = comparisons[comparisons["metric"] == metric]
    if comparisons.empty:
        return pd.DataFrame(columns=columns)
    counts = comparisons.groupby([*by, "verdict"], sort=False).size().unstack(fill_value=0)
    for verdict_name in ("win", "tie", "loss"):
        if verdict_name not in counts:
            counts[verdict_name] = 0
    counts["n"] = counts[["win", "tie", "loss"]].sum(axis=1)
    return counts.reset_index()[columns]
