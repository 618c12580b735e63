"""medseg.benchmark.stats against scipy and against simulated data with a known truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from medseg.benchmark.stats import (
    Interval,
    bootstrap_ci,
    decide,
    higher_is_better,
    holm,
    paired_difference,
    verdict,
    wilcoxon_p,
)
from medseg.errors import ConfigError, MedsegError


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_ci_equals_scipy_on_the_same_resamples(method):
    values = np.random.default_rng(1).gamma(2.0, 0.2, size=17)
    ours = bootstrap_ci(values, n_resamples=2000, method=method, seed=np.random.default_rng(7))
    theirs = stats.bootstrap(
        (values,), np.mean, n_resamples=2000, method=method, rng=np.random.default_rng(7), vectorized=True
    ).confidence_interval
    assert ours.estimate == pytest.approx(values.mean())
    assert ours.low == pytest.approx(theirs.low, rel=1e-12)
    assert ours.high == pytest.approx(theirs.high, rel=1e-12)
    assert (ours.n, ours.n_values) == (17, 17)


def test_bootstrap_ci_covers_a_known_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = sum(bootstrap_ci(rng.normal(0.7, 0.1, 40), n_resamples=500, seed=rng).covers(0.7) for _ in range(300))
    assert 0.90 <= hits / 300 <= 0.985


def test_block_bootstrap_is_wider_than_the_naive_one_on_correlated_units():
    rng = np.random.default_rng(3)
    case_effect = rng.normal(0.0, 0.1, 12)
    groups = np.repeat(np.arange(12), 10)  # e.g. 10 slices of each of 12 volumes
    values = 0.8 + case_effect[groups] + rng.normal(0.0, 0.01, groups.size)
    naive = bootstrap_ci(values, seed=0)
    block = bootstrap_ci(values, groups=groups, seed=0)
    assert block.estimate == pytest.approx(naive.estimate)
    assert (block.high - block.low) > 2.0 * (naive.high - naive.low)
    assert (block.n, block.n_values) == (12, 120)


def test_block_bootstrap_of_equal_groups_matches_the_bootstrap_of_group_means():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(9, 3))  # 9 cases x 3 seeds
    groups = np.repeat(np.arange(9), 3)
    block = bootstrap_ci(values.ravel(), groups=groups, n_resamples=3000, seed=np.random.default_rng(2))
    means = bootstrap_ci(values.mean(axis=1), n_resamples=3000, seed=np.random.default_rng(2))
    assert (block.low, block.high) == pytest.approx((means.low, means.high), rel=1e-9)


def test_nan_values_are_left_out_and_a_single_unit_has_a_zero_width_interval():
    interval = bootstrap_ci([0.5, np.nan, np.nan])
    assert (interval.estimate, interval.low, interval.high, interval.n) == (0.5, 0.5, 0.5, 1)
    with pytest.raises(ConfigError, match="no finite values"):
        bootstrap_ci([np.nan])
    with pytest.raises(ConfigError, match="percentile"):
        bootstrap_ci([1.0, 2.0], method="student")


def test_paired_difference_pairs_values_and_drops_incomplete_pairs():
    a = np.array([0.9, 0.8, 0.85, np.nan, 0.7])
    b = np.array([0.8, 0.7, 0.80, 0.50, 0.6])
    diff = paired_difference(a, b, seed=0)
    assert diff.estimate == pytest.approx(np.mean([0.1, 0.1, 0.05, 0.1]))
    assert diff.n == 4 and diff.low > 0
    with pytest.raises(ConfigError, match="same length"):
        paired_difference([1.0], [1.0, 2.0])


def test_wilcoxon_equals_scipy_and_identical_arms_give_one():
    d = np.array([0.12, -0.03, 0.08, 0.15, 0.02, 0.09, -0.01, 0.11])
    assert wilcoxon_p(d) == pytest.approx(stats.wilcoxon(d).pvalue)
    assert wilcoxon_p([0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.125)  # four cases: the smallest exact p
    assert wilcoxon_p(np.zeros(5)) == 1.0


def test_holm_on_a_hand_checked_family():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> 0.06 (monotone)
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(holm([0.2, np.nan])[1]) and holm([0.2, np.nan])[0] == pytest.approx(0.2)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_holm_agrees_with_its_definition_on_random_families():
    # Holm (1979): with p sorted ascending, p_adj(i) = max over j <= i of min(1, (m - j + 1) * p_(j)), in input order
    rng = np.random.default_rng(5)
    for size in (1, 2, 7, 12):
        p = rng.uniform(0, 0.3, size)
        order = np.argsort(p)
        stepped = np.minimum(1.0, (size - np.arange(size)) * p[order])
        expected = np.empty(size)
        expected[order] = np.maximum.accumulate(stepped)
        assert holm(p) == pytest.approx(expected)


def test_verdict_follows_the_metric_direction_and_ties_when_the_ci_covers_zero():
    better = Interval(0.05, 0.01, 0.09, 4, 4)
    assert verdict(better, "dice") == "win"
    assert verdict(better, "nsd/grey_matter") == "win"
    assert verdict(better, "hd95") == "loss"  # a larger distance in mm is worse
    assert verdict(Interval(-2.0, -3.0, -1.0, 4, 4), "noc") == "win"
    assert verdict(Interval(0.05, -0.01, 0.09, 4, 4), "dice") == "tie"
    assert higher_is_better("Dice") is True
    with pytest.raises(MedsegError, match="no known direction"):
        higher_is_better("accuracy")


def test_decide_needs_the_ci_and_the_holm_p():
    favour, against, covering = (
        Interval(0.1, 0.05, 0.15, 20, 20),
        Interval(-0.1, -0.15, -0.05, 20, 20),
        Interval(0.01, -0.02, 0.04, 20, 20),
    )
    assert decide(favour, 0.001, "dice") == "win"
    assert decide(against, 0.001, "dice") == "loss"
    assert decide(favour, 0.001, "hd95") == "loss"  # a larger distance is worse
    assert decide(covering, 0.001, "dice") == "tie"  # the CI covers 0: significant p or not
    assert decide(favour, 0.5, "dice") == "tie"  # the CI excludes 0 but Holm's p does not agree
    assert decide(favour, 0.04, "dice", alpha=0.01) == "tie" and decide(favour, 0.04, "dice") == "win"
    assert decide(favour, float("nan"), "dice") == "tie"
    with pytest.raises(ConfigError, match="alpha"):
        decide(favour, 0.01, "dice", alpha=5)
