"""``report.md``: what a person reads first -- the win/tie/loss verdicts and their counts, then the question, the
setup, tables with CIs, every comparison, costs and compute, limitations.

Everything in it comes from the benchmark's tables (``summary.csv``, ``comparisons.csv``, ``cost.csv``) and its
settings; the only prose is the fixed explanation of the method and the limitations that follow from the numbers
(few test cases, a Wilcoxon test that cannot reach significance, failed runs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medseg.atomic import atomic_write_text
from medseg.benchmark.compare import QUESTIONS, win_tie_loss
from medseg.benchmark.plots import PLOTS

__all__ = ["markdown_table", "render_report", "write_report"]


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(frame: pd.DataFrame, columns: Sequence[str], digits: int = 3) -> str:
    """A GitHub-flavoured markdown table of ``columns`` (floats with ``digits`` decimals, NaN as n/a)."""
    if frame.empty:
        return "_(none)_\n"
    columns = [c for c in columns if c in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _with_ci(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = summary[summary["metric"] == metric].copy()
    rows["value"] = [
        f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in zip(rows["mean"], rows["ci_low"], rows["ci_high"])
    ]
    table = rows.pivot_table(index="arm", columns="label_fraction", values="value", aggfunc="first", sort=False)
    table.columns = [f"{100 * f:g} % labels" for f in table.columns]
    return table.reset_index()


def _limitations(facts: Mapping[str, Any], comparisons: pd.DataFrame, failures: Sequence[Mapping[str, Any]]) -> list:
    items = list(facts.get("limitations") or [])
    n_cases = facts.get("n_test_cases")
    if n_cases:
        items.append(
            f"{n_cases} test cases per dataset: the CIs resample cases, so they are wide, and with fewer than 6 cases "
            f"the two-sided Wilcoxon test cannot reach p < 0.05 (smallest exact p with 4 cases: 0.125)."
        )
    items.append(
        "A verdict is a win or a loss only when the 95 % CI of the paired difference excludes 0 and the Holm-corrected "
        "Wilcoxon p is below alpha; the CIs themselves are not adjusted for multiplicity (the p-values are), and "
        "`ci_verdict` in `comparisons.csv` shows what the CI alone would say."
    )
    items.append(
        "The learning rate of each arm was chosen at one label fraction and seed, on the validation cases, and reused "
        "for every budget and seed; the best CNN baseline is picked by its test mean, which favours the baseline."
    )
    if facts.get("nnunet_arms"):
        items.append(
            "nnU-Net arms train with nnU-Net's own plans, batch, patch, augmentation and optimiser for the same number "
            "of iterations, not the same images per step or the same FLOPs (see `cost.csv`); they are not searched."
        )
    if facts.get("device") == "cpu":
        items.append("Trained on CPU with a small step budget: the absolute numbers are far from converged models'.")
    if failures:
        items.append(f"{len(failures)} run(s) failed and are missing from the tables (see 'Failed runs').")
    return items


def _verdicts(facts: Mapping[str, Any], comparisons: pd.DataFrame, primary: str) -> list[str]:
    """The report's opening: the win/tie/loss table per question, dataset and budget, and its counts."""
    alpha = float(facts.get("alpha", 0.05))
    confidence = 100 * float((facts.get("statistics") or {}).get("confidence", 0.95))
    out = [f"## Verdicts: win / tie / loss ({primary})\n"]
    out.append(
        f"Arm a against arm b: **win** when the {confidence:g} % bootstrap CI of the paired difference (a - b) "
        f"excludes 0 in the metric's good direction **and** the Holm-corrected "
        f"Wilcoxon p < {alpha:g}; **loss** in the reverse case; **tie** otherwise.\n"
    )
    table = win_tie_loss(comparisons, metric=primary)
    if table.empty:
        out.append("_(no comparisons: too few finished runs or no pairs in the grid)_\n")
        return out
    table = table.assign(question=[QUESTIONS.get(k, k) for k in table["kind"]])
    table["label budget"] = [f"{100 * float(f):g} %" for f in table["label_fraction"]]
    out.append(markdown_table(table, ["question", "dataset", "label budget", "win", "tie", "loss", "n"]))
    wins, ties, losses = (int(table[c].sum()) for c in ("win", "tie", "loss"))
    out.append(f"**Counts**: {wins} win(s), {ties} tie(s), {losses} loss(es) in {wins + ties + losses} comparisons.\n")
    return out


def _budget_line(facts: Mapping[str, Any]) -> str:
    steps = facts.get("max_steps", "?")
    if facts.get("match") == "compute" and isinstance(steps, Mapping):
        per_arm = ", ".join(f"{arm} {n}" for arm, n in steps.items())
        return (
            f"- Budget: matched by compute: every arm whose FLOPs are counted trains "
            f"{float(facts.get('budget_flops') or 0):.3g} training FLOPs (steps: {per_arm}) on "
            f"{facts.get('device', '?')}, then is evaluated with its last weights.\n"
        )
    return (
        f"- Budget: every run trains {steps} optimisation steps of {facts.get('samples_per_step', '?')} images "
        f"({facts.get('device', '?')}; an nnU-Net arm: {steps} of its own iterations at its planned batch), then is "
        f"evaluated with its last weights.\n"
    )


def render_report(
    facts: Mapping[str, Any],
    summary: pd.DataFrame,
    comparisons: pd.DataFrame,
    cost: pd.DataFrame,
    failures: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The markdown text of ``report.md``; it opens with the win/tie/loss table.

    Args:
        facts: ``question``, ``experiment``, ``datasets``, ``arms`` (``{name: overrides}``), ``not_searched``
            (``{arm: reason}``), ``label_fractions``, ``seeds``, ``max_steps`` (a number, or per arm when matched by
            compute), ``match``, ``budget_flops``, ``samples_per_step``, ``lr_values``, ``search`` (fraction, seed,
            metric), ``chosen_lr`` (``{arm: lr}``), ``n_test_cases``, ``metrics``, ``primary_metric``, ``statistics``,
            ``alpha``, ``nnunet_arms``, ``wall_time_s``, ``device``, ``limitations``, ``command``.
        summary, comparisons, cost: the benchmark's tables.
        failures: ``{arm, phase, run_dir, error}`` of failed runs.
    """
    primary = facts.get("primary_metric", "dice")
    stats = facts.get("statistics") or {}
    out = [f"# Benchmark: {facts.get('experiment', '?')}\n"]
    out.extend(_verdicts(facts, comparisons, primary))
    out.append(f"**Question.** {facts.get('question') or 'Does each arm beat its reference at equal budget?'}\n")
    if facts.get("command"):
        out.append(f"Reproduce with `{facts['command']}` (finished runs are reused; delete the folder to retrain).\n")
    out.append("## Setup\n")
    search = facts.get("search") or {}
    lrs = ", ".join(f"{v:g}" for v in facts.get("lr_values", []))
    not_searched = facts.get("not_searched") or {}
    out.append(
        f"- Data: {', '.join(facts.get('datasets', []))}; label fractions "
        f"{', '.join(f'{100 * f:g} %' for f in facts.get('label_fractions', []))} of the fold's training cases "
        f"(nested subsets); seeds {', '.join(str(s) for s in facts.get('seeds', []))}; "
        f"{facts.get('n_test_cases', '?')} held-out test cases, scored on their native grid.\n"
        + _budget_line(facts)
        + f"- Tuning: each arm searches the learning rate over the same {len(facts.get('lr_values', []))} candidates "
        f"({lrs}) at label fraction {search.get('label_fraction', '?')} and seed {search.get('seed', '?')}, chosen on "
        f"`{search.get('metric', '?')}` of the validation cases at the end of the budget; test cases are never seen."
        + (f" Not searched (their own learning rate): {', '.join(not_searched)}.\n" if not_searched else "\n")
        + f"- Statistics: mean over cases and seeds with a {100 * float(stats.get('confidence', 0.95)):g} % "
        f"{stats.get('method', 'percentile')} bootstrap CI ({stats.get('n_resamples', '?')} resamples of cases; "
        f"seeds of a case are resampled together); paired differences on (seed, case) with the same bootstrap; "
        f"Wilcoxon signed-rank on per-case differences; Holm correction over all comparisons of a metric.\n"
        f"- Total wall time: {facts.get('wall_time_s', 0):.0f} s for the runs this invocation trained.\n"
    )
    arms = facts.get("arms") or {}
    chosen = facts.get("chosen_lr") or {}

    def lr_cell(arm: str) -> Any:
        if arm in not_searched:
            return "not searched: own"
        return chosen.get(arm) if chosen.get(arm) is not None else float("nan")

    arm_rows = pd.DataFrame(
        [{"arm": a, "overrides": " ".join(o) or "-", "chosen lr": lr_cell(a)} for a, o in arms.items()]
    )
    out.append("### Arms\n")
    out.append(markdown_table(arm_rows, ["arm", "overrides", "chosen lr"], digits=6))
    out.extend(f"- `{arm}` is not searched: {reason}.\n" for arm, reason in not_searched.items() if reason)
    out.append("## Results\n")
    for metric in facts.get("metrics", [primary]):
        out.append(f"### Test {metric} (mean [95 % CI])\n")
        table = _with_ci(summary, metric)
        out.append(markdown_table(table, list(table.columns)) if not table.empty else "_(no finished runs)_\n")
    out.append(f"### Comparisons ({primary})\n")
    shown = comparisons[comparisons["metric"] == primary] if not comparisons.empty else comparisons
    out.append(markdown_table(shown, ["arm_a", "arm_b", "kind", "label_fraction", "mean_diff", "ci_low", "ci_high",
                                      "p_value", "p_holm", "ci_verdict", "verdict"]))  # fmt: skip
    out.append("`verdict`: the rule above (CI and Holm p); `ci_verdict`: the CI alone. Every metric's comparisons are "
               "in `comparisons.csv`.\n")  # fmt: skip
    out.append("### Win / tie / loss per pair, across datasets and budgets\n")
    per_pair = win_tie_loss(comparisons, by=("arm_a", "arm_b", "kind", "metric"))
    out.append(markdown_table(per_pair, ["arm_a", "arm_b", "kind", "metric", "win", "tie", "loss"]))
    out.append("## Cost and compute\n")
    out.append(markdown_table(cost, ["arm", "trainable_params", "total_params", "trainable_percent", "flops_per_step",
                                     "train_flops", "matched_by", "train_wall_time_s", "device_hours", "peak_rss_mb",
                                     "peak_gpu_memory_mb", "eval_seconds_per_case", "train_samples_per_s",
                                     "search_wall_time_s"], digits=2))  # fmt: skip
    out.append("Wall times are seconds per run (mean over runs); `eval_seconds_per_case` is the test evaluation's "
               "wall time per case (set-up included; each case's own seconds are the `seconds` rows of "
               "`per_case.csv`); peak memory is the resident set (MB) of one run (an nnU-Net run's includes its child "
               "process) and torch's peak GPU allocation. `flops_per_step`: forward + backward of one training step "
               "as torch's FlopCounterMode counts it (matrix products and convolutions); `train_flops` = "
               "`flops_per_step` x steps; `device_hours`: the arm's device time in the whole benchmark (final runs' "
               "training and evaluation, and its search).\n")  # fmt: skip
    if "flops_note" in cost:
        out.extend(f"- `{row['arm']}` FLOPs: {row['flops_note']}.\n" for _, row in cost.iterrows())
    out.append("## Plots\n")
    out.extend(f"![{name}]({name})\n" for name in PLOTS)
    if failures:
        out.append("## Failed runs\n")
        out.append(markdown_table(pd.DataFrame(list(failures)), ["arm", "phase", "run_dir", "error"]))
    out.append("## Limitations\n")
    out.extend(f"- {item}\n" for item in _limitations(facts, comparisons, failures))
    return "\n".join(out)


def write_report(path: str | Path, *args: Any, **kwargs: Any) -> Path:
    """Render (see :func:`render_report`) and write ``report.md`` atomically."""
    return atomic_write_text(path, render_report(*args, **kwargs))
