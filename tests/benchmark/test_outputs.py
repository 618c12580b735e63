"""summary.csv, comparisons.csv, plots and report.md written from a constructed per-case table (no training)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medseg.benchmark.compare import arm_pairs, win_tie_loss
from medseg.benchmark.grid import BenchmarkSettings
from medseg.benchmark.outputs import write_tables

ARMS = {"backbone": ["sam"], "adapter": ["lora", "full"], "init": ["pretrained", "scratch"]}


@pytest.fixture
def settings() -> BenchmarkSettings:
    node = {"arms": ARMS, "baselines": {"unet": ["model=unet_2d"], "dynunet": ["model=dynunet_3d"]},
            "label_fractions": [0.1, 1.0], "seeds": [0, 1], "lr_search": {"values": [1e-3]},
            "metrics": ["dice", "hd95"], "primary_metric": "dice",
            "statistics": {"n_resamples": 1000, "confidence": 0.95, "method": "percentile", "seed": 0}}  # fmt: skip
    return BenchmarkSettings.from_config("bench_test", node)


def _per_case(settings: BenchmarkSettings) -> pd.DataFrame:
    """Ten cases; pretrained arms +0.1 Dice over scratch, lora equal to full, unet best baseline at 0.7."""
    rng = np.random.default_rng(0)
    case_effect = rng.normal(0, 0.05, 10)
    level = {"sam__lora__pretrained": 0.8, "sam__full__pretrained": 0.8, "sam__lora__scratch": 0.7,
             "sam__full__scratch": 0.7, "unet": 0.7, "dynunet": 0.5}  # fmt: skip
    rows = []
    for arm, dice in level.items():
        for fraction in settings.label_fractions:
            for seed in settings.seeds:
                for case in range(10):
                    value = dice + case_effect[case] + rng.normal(0, 0.005)
                    common = {"arm": arm, "dataset": "D", "label_fraction": fraction, "seed": seed, "case": f"c{case}"}
                    rows.append({**common, "metric": "dice", "value": value})
                    rows.append({**common, "metric": "hd95", "value": 10 * (1 - value)})
    return pd.DataFrame(rows)


def test_pairs_follow_the_grid(settings):
    pairs = arm_pairs(settings.arms)
    assert ("sam__lora__pretrained", "sam__lora__scratch", "pretrained_vs_scratch") in pairs
    assert ("sam__lora__scratch", "sam__full__scratch", "adapter_vs_full") in pairs
    assert not any(kind == "adapter_vs_full" and a.startswith("sam__full") for a, _, kind in pairs)
    assert len(pairs) == 4


def test_tables_report_and_plots_from_a_constructed_table(settings, tmp_path):
    per_case = _per_case(settings)
    cost = pd.DataFrame({"arm": list(per_case["arm"].unique()), "trainable_params": [1e5, 1e7, 1e5, 1e7, 2e6, 3e6],
                         "train_wall_time_s": [10.0, 20.0, 10.0, 20.0, 5.0, 6.0]})  # fmt: skip
    paths = write_tables(tmp_path, settings, per_case, cost, {"max_steps": 8, "device": "cpu"})
    for name in ("summary.csv", "comparisons.csv", "report.md", "metric_vs_label_fraction.png",
                 "metric_vs_trainable_params.png", "metric_vs_train_time.png"):  # fmt: skip
        assert paths[name].is_file() and paths[name].stat().st_size > 0

    summary = pd.read_csv(tmp_path / "summary.csv")
    row = summary[(summary["arm"] == "unet") & (summary["metric"] == "dice") & (summary["label_fraction"] == 1.0)]
    values = per_case.query("arm == 'unet' and metric == 'dice' and label_fraction == 1.0")["value"]
    assert row["mean"].item() == pytest.approx(values.mean())
    assert row["n"].item() == 10 and row["n_values"].item() == 20  # 10 cases (blocks) x 2 seeds

    comparisons = pd.read_csv(tmp_path / "comparisons.csv")
    dice = comparisons[comparisons["metric"] == "dice"]
    verdicts = dice.groupby("kind")["verdict"].agg(set).to_dict()
    assert verdicts["pretrained_vs_scratch"] == {"win"}
    lora_vs_full = dice[(dice["kind"] == "adapter_vs_full")]
    assert (lora_vs_full["ci_low"] < 0).all() and (lora_vs_full["ci_high"] > 0).all()
    assert set(lora_vs_full["verdict"]) == {"tie"}
    assert set(dice.loc[dice["kind"] == "vs_best_baseline", "arm_b"]) == {"unet"}  # not the weaker dynunet
    hd95 = comparisons[(comparisons["metric"] == "hd95") & (comparisons["kind"] == "pretrained_vs_scratch")]
    assert set(hd95["verdict"]) == {"win"}  # lower distance is better
    assert (comparisons["p_holm"] >= comparisons["p_value"] - 1e-12).all()

    counts = win_tie_loss(comparisons, by=("arm_a", "arm_b", "kind", "metric"))
    pre = counts[(counts["arm_a"] == "sam__lora__pretrained") & (counts["kind"] == "pretrained_vs_scratch")]
    assert pre.loc[pre["metric"] == "dice", ["win", "tie", "loss"]].values.tolist() == [[2, 0, 0]]  # two budgets
    per_question = win_tie_loss(comparisons, metric="dice").set_index(["kind", "label_fraction"])
    assert per_question.loc[("pretrained_vs_scratch", 1.0), ["win", "tie", "loss", "n"]].tolist() == [2, 0, 0, 2]
    assert per_question.loc[("adapter_vs_full", 0.1), ["win", "tie", "loss"]].tolist() == [0, 2, 0]

    report = (tmp_path / "report.md").read_text()
    assert report.split("\n## ")[1].startswith("Verdicts: win / tie / loss (dice)")  # the report opens with it
    assert "| pretrained vs scratch (same adapter) | D | 10 % | 2 | 0 | 0 | 2 |" in report
    assert "**Counts**:" in report
    for heading in ("**Question.**", "## Setup", "## Results", "### Comparisons", "## Cost", "## Limitations"):
        assert heading in report
    assert "0.1" in report and "10 held-out test cases" in report


def test_promptable_runs_add_their_interactive_metrics_per_case():
    from medseg.benchmark.collect import per_case_rows
    from medseg.benchmark.stats import higher_is_better

    scores = {"dice": 0.5, "nsd": 0.6, "hd95": 3.0}
    summary = {
        "dataset": "Dataset990_Synthetic",
        "metric_per_case": [{"case_id": "c1", "metrics": {"liver": scores}}],
        "interactive": {"per_case": {"c1": {"mean": {"dice_at_k": [0.4, 0.7], "noc85": 20, "box_dice": 0.8}}}},
    }
    rows = {r["metric"]: r["value"] for r in per_case_rows(summary, "arm", 1.0, 0)}
    assert rows["dice_click1"] == 0.4 and rows["dice_click2"] == 0.7 and rows["noc85"] == 20.0
    assert rows["box_dice"] == 0.8 and "propagation_dice" not in rows and rows["dice"] == 0.5
    assert higher_is_better("dice_click2") and not higher_is_better("noc85")


def test_segfm3d_protocol_numbers_become_per_case_rows_with_their_direction():
    from medseg.benchmark.collect import per_case_rows
    from medseg.benchmark.stats import higher_is_better

    scores = {"dice": 0.5, "nsd": 0.6, "hd95": 3.0}
    entry = {"classes": ["liver"], "dsc_auc": 2.5, "nsd_auc": 2.0, "final_dsc": 0.7, "final_nsd": 0.6,
             "seconds_per_step": 0.25}  # fmt: skip
    summary = {
        "dataset": "D",
        "metric_per_case": [{"case_id": "c1", "metrics": {"liver": scores}}],
        "protocol": {"name": "segfm3d", "per_case": {"c1": entry, "c2": {"classes": [], "skipped": "empty"}}},
    }
    rows = [r for r in per_case_rows(summary, "arm", 1.0, 0) if r["metric"].startswith("segfm3d_")]
    assert {(r["case"], r["metric"], r["value"]) for r in rows} == {
        ("c1", "segfm3d_dsc_auc", 2.5), ("c1", "segfm3d_nsd_auc", 2.0), ("c1", "segfm3d_final_dsc", 0.7),
        ("c1", "segfm3d_final_nsd", 0.6), ("c1", "segfm3d_seconds_per_step", 0.25),
    }  # fmt: skip
    assert higher_is_better("segfm3d_final_dsc") and not higher_is_better("segfm3d_seconds_per_step")
    other = {**summary, "protocol": {"name": "another", "per_case": {"c1": entry}}}
    assert not [r for r in per_case_rows(other, "arm", 1.0, 0) if r["metric"].startswith("segfm3d_")]


def test_seconds_per_case_reach_per_case_and_cost_tables(tmp_path):
    from medseg.benchmark.collect import SECONDS, cost_table, per_case_rows
    from medseg.benchmark.report import render_report

    scores = {"liver": {"dice": 0.5, "nsd": 0.6, "hd95": 3.0}}
    cases = [{"case_id": "c1", "metrics": scores, "seconds": 0.4}, {"case_id": "c2", "metrics": scores, "seconds": 0.6}]
    summary = {"dataset": "D", "metric_per_case": cases, "n_cases": 2, "eval_wall_time_s": 1.5,
               "seconds_per_case": 0.75}  # fmt: skip
    rows = [r for r in per_case_rows(summary, "arm", 1.0, 0) if r["metric"] == SECONDS]
    assert [(r["case"], r["value"]) for r in rows] == [("c1", 0.4), ("c2", 0.6)]
    assert sum(r["value"] for r in rows) <= summary["eval_wall_time_s"]
    older = {"dataset": "D", "metric_per_case": [{"case_id": "c1", "metrics": scores}], "n_cases": 4,
             "eval_wall_time_s": 10.0}  # fmt: skip
    assert not [r for r in per_case_rows(older, "old", 1.0, 0) if r["metric"] == SECONDS]  # not timed: no row
    runs = [{"arm": "arm", "lr": 1e-3, "run_dir": tmp_path, "summary": summary, "job": None},
            {"arm": "old", "lr": 1e-3, "run_dir": tmp_path, "summary": older, "job": None}]  # fmt: skip
    cost = cost_table(runs).set_index("arm")
    assert cost.loc["arm", "eval_seconds_per_case"] == 0.75
    assert cost.loc["old", "eval_seconds_per_case"] == 2.5  # eval wall time over n_cases
    report = render_report({"metrics": []}, pd.DataFrame(), pd.DataFrame(), cost.reset_index())
    assert "eval_seconds_per_case" in report and "| 0.75 |" in report
