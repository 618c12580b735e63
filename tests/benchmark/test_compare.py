"""Comparisons with known answers: clear win, clear loss, tie, and a CI that excludes 0 on too few cases for Holm."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medseg.benchmark.compare import arm_pairs, best_baseline, comparisons_table, summary_table, win_tie_loss
from medseg.benchmark.grid import parse_arms

STATS = {"n_resamples": 2000, "confidence": 0.95, "method": "percentile", "seed": 0, "alpha": 0.05}


def _arms():
    return parse_arms(
        {"adapter": ["lora", "full"], "init": ["pretrained", "scratch"]},
        {"unet": ["model=unet_2d"], "nnunet_2d": ["+nnunet=2d"]},
    )


def test_pairs_add_each_arm_vs_nnunet_and_the_best_cnn_baseline_is_not_nnunet():
    arms = _arms()
    pairs = arm_pairs(arms)
    vs_nnunet = sorted(a for a, b, kind in pairs if kind == "vs_nnunet" and b == "nnunet_2d")
    assert vs_nnunet == sorted(["lora__pretrained", "lora__scratch", "full__pretrained", "full__scratch", "unet"])
    assert not [p for p in pairs if p[0] == "nnunet_2d"]
    summary = pd.DataFrame({"arm": ["unet", "nnunet_2d"], "dataset": "D", "label_fraction": 1.0, "metric": "dice",
                            "mean": [0.5, 0.9]})  # fmt: skip
    assert best_baseline(summary, arms, "D", 1.0, "dice") == "unet"  # nnU-Net has its own question


def _per_case(level: dict[str, float], cases: int, fractions=(1.0,), noise: float = 0.002) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    effect = rng.normal(0, 0.05, cases)
    rows = []
    for fraction in fractions:
        for arm, dice in level.items():
            for case in range(cases):
                value = dice + effect[case] + rng.normal(0, noise)
                rows.append({"arm": arm, "dataset": "D", "label_fraction": fraction, "seed": 0, "case": f"c{case}",
                             "metric": "dice", "value": value})  # fmt: skip
    return pd.DataFrame(rows)


def test_known_verdicts_on_twenty_cases():
    # pretrained beats scratch by 0.1 with LoRA (win) and loses by 0.1 with full fine-tuning (loss); nnU-Net is level
    # with every LoRA arm... up to noise larger than any difference (tie: the CI covers 0)
    level = {"lora__pretrained": 0.8, "lora__scratch": 0.7, "full__pretrained": 0.6, "full__scratch": 0.7,
             "unet": 0.5, "nnunet_2d": 0.8}  # fmt: skip
    per_case = _per_case(level, 20)
    arms = _arms()
    table = comparisons_table(per_case, arms, ["dice"], "dice", STATS, summary_table(per_case, ["dice"], STATS))
    by_pair = table.set_index(["arm_a", "arm_b"])
    assert by_pair.loc[("lora__pretrained", "lora__scratch"), "verdict"] == "win"
    assert by_pair.loc[("full__pretrained", "full__scratch"), "verdict"] == "loss"
    tie = by_pair.loc[("lora__pretrained", "nnunet_2d")]
    assert tie["ci_low"] < 0 < tie["ci_high"] and tie["verdict"] == "tie" and tie["ci_verdict"] == "tie"
    assert by_pair.loc[("unet", "nnunet_2d"), "verdict"] == "loss"
    assert (table["p_holm"] >= table["p_value"] - 1e-12).all()

    counts = win_tie_loss(table, metric="dice").set_index("kind")
    assert counts.loc["pretrained_vs_scratch", ["win", "tie", "loss", "n"]].tolist() == [1, 0, 1, 2]
    # vs nnU-Net: lora__pretrained ties, every other arm is at least 0.1 below it
    assert counts.loc["vs_nnunet", ["win", "tie", "loss", "n"]].tolist() == [0, 1, 4, 5]


def test_a_ci_that_excludes_zero_on_four_cases_is_a_tie():
    # four cases, every one +0.1: the CI excludes 0, but the smallest exact Wilcoxon p is 0.125 (Holm: larger)
    per_case = _per_case({"lora__pretrained": 0.8, "lora__scratch": 0.7}, 4)
    arms = parse_arms({"adapter": ["lora"], "init": ["pretrained", "scratch"]}, {})
    row = comparisons_table(per_case, arms, ["dice"], "dice", STATS).iloc[0]
    assert row["ci_low"] > 0 and row["ci_verdict"] == "win"
    assert row["p_value"] == pytest.approx(0.125) and row["verdict"] == "tie"


def test_holm_decides_when_the_family_is_large():
    # one real difference on 8 cases (p = 0.0078) is a win alone, but not among 8 label budgets of it (Holm x 8)
    level = {"lora__pretrained": 0.8, "lora__scratch": 0.7}
    arms = parse_arms({"adapter": ["lora"], "init": ["pretrained", "scratch"]}, {})
    alone = comparisons_table(_per_case(level, 8), arms, ["dice"], "dice", STATS)
    assert alone["verdict"].tolist() == ["win"]
    family = comparisons_table(_per_case(level, 8, fractions=np.linspace(0.1, 0.8, 8)), arms, ["dice"], "dice", STATS)
    assert (family["ci_verdict"] == "win").all() and (family["p_holm"] > 0.05).all()
    assert (family["verdict"] == "tie").all()
    assert win_tie_loss(family)[["win", "tie", "loss"]].sum().tolist() == [0, 8, 0]
