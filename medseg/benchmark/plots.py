"""The benchmark's figures (PNG): the primary metric against label fraction, trainable parameters, training time and
training compute (FLOPs per run; arms whose FLOPs are unknown are left out of that plot and named in its title).

matplotlib runs headless (the Agg backend), so plots are written on servers and in CI without a display.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["PLOTS", "write_plots"]

PLOTS = (
    "metric_vs_label_fraction.png", "metric_vs_trainable_params.png", "metric_vs_train_time.png",
    "metric_vs_train_flops.png",
)  # fmt: skip


def _pyplot():
    import matplotlib  # lazy: matplotlib is slow to import, and only the plots need it

    matplotlib.use("Agg")  # before pyplot is imported: no display needed
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    return plt


def write_plots(summary: pd.DataFrame, cost: pd.DataFrame, metric: str, folder: str | Path) -> list[Path]:
    """Write the four figures of ``metric`` (e.g. ``dice``) into ``folder``; returns their paths.

    Args:
        summary: ``summary.csv``'s table (arm, dataset, label_fraction, metric, mean, ci_low, ci_high, ...).
        cost: ``cost.csv``'s table (arm, trainable_params, train_wall_time_s, train_flops, ...).
        metric: the metric on the y axis.
        folder: where the PNG files go.
    """
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = summary[summary["metric"] == metric].sort_values("label_fraction")
    label = f"test {metric} (mean, 95 % CI)"
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm, group in rows.groupby("arm", sort=False):
        percent = 100 * group["label_fraction"]
        (line,) = ax.plot(percent, group["mean"], marker="o", label=arm)
        ax.fill_between(percent, group["ci_low"], group["ci_high"], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="labelled training cases (%)", ylabel=label, title=f"{metric} vs label budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, folder / PLOTS[0], plt))

    largest = rows[rows["label_fraction"] == rows["label_fraction"].max()] if not rows.empty else rows
    merged = largest.merge(cost, on="arm", how="inner")
    for column, xlabel, name, log in (
        ("trainable_params", "trainable parameters", PLOTS[1], True),
        ("train_wall_time_s", "training wall time per run (s)", PLOTS[2], False),
        ("train_flops", "training FLOPs per run", PLOTS[3], True),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        known = merged[pd.to_numeric(merged[column], errors="coerce").notna()] if column in merged else merged.iloc[:0]
        missing = sorted(set(merged["arm"]) - set(known["arm"])) if "arm" in merged else []
        for _, row in known.iterrows():
            error = [[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]]
            ax.errorbar(row[column], row["mean"], yerr=error, fmt="o", capsize=3, label=row["arm"])
        if log and not known.empty and (known[column].astype(float) > 0).all():
            ax.set_xscale("log")
        fraction = f"{100 * largest['label_fraction'].max():g} % labels" if not largest.empty else ""
        title = f"{metric} vs {xlabel.split(' (')[0]} ({fraction})"
        ax.set(xlabel=xlabel, ylabel=label, title=title + (f"\nnot counted: {', '.join(missing)}" if missing else ""))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        paths.append(_save(fig, folder / name, plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
