"""Statistics of a benchmark: bootstrap confidence intervals, paired tests, Holm's correction and verdicts.

A benchmark compares arms on a handful of test cases, so the uncertainty is as large as the differences it is meant
to show; these functions make it visible. The conventions follow Jeong et al. (arXiv 2411.08870):

* each arm's mean with a 95 % bootstrap confidence interval over cases (the unit that is drawn from a population);
* a **block** bootstrap when the units are correlated (slices of one volume, seeds of one case): whole groups are
  resampled, so the interval is not made narrower by counting one case several times;
* per pair of arms, the paired mean difference with its bootstrap CI, the Wilcoxon signed-rank p-value, and the
  Holm-corrected p-value over the family of comparisons;
* a verdict (:func:`decide`, the rule of medseg issue 19): ``win`` when the CI of the difference excludes 0 in the
  metric's good direction (higher is better for Dice and NSD, lower for HD95 in mm and the number of clicks) **and**
  the Holm-corrected Wilcoxon p is below alpha, ``loss`` in the reverse case, ``tie`` otherwise -- a CI that excludes
  0 on four cases is not enough on its own; :func:`verdict` is the CI half alone.

Resampling is vectorised with numpy and seeded. Without groups, :func:`bootstrap_ci` draws exactly the resamples of
:func:`scipy.stats.bootstrap` given the same generator, so its intervals equal scipy's (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from medseg.errors import ConfigError

__all__ = [
    "HIGHER_IS_BETTER",
    "Interval",
    "bootstrap_ci",
    "decide",
    "higher_is_better",
    "holm",
    "paired_difference",
    "verdict",
    "wilcoxon_p",
]

HIGHER_IS_BETTER = {
    "dice": True, "nsd": True, "box_dice": True, "propagation_dice": True,
    "hd95": False, "noc": False, "noc85": False, "noc90": False,
    "segfm3d_dsc_auc": True, "segfm3d_nsd_auc": True, "segfm3d_final_dsc": True, "segfm3d_final_nsd": True,
    "segfm3d_seconds_per_step": False,
}  # fmt: skip
_CHUNK = 4_000_000  # resampled values held in memory at once (32 MB of float64)


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap confidence interval.

    Attributes:
        estimate: the mean over all units (in the metric's unit: Dice fraction, mm, clicks).
        low, high: the interval's ends.
        n: independent units resampled (cases, or groups for a block bootstrap).
        n_values: values averaged (``n`` times the units per group, for a block bootstrap).
    """

    estimate: float
    low: float
    high: float
    n: int
    n_values: int

    def covers(self, value: float = 0.0) -> bool:
        """Whether ``value`` lies inside the interval (ends included)."""
        return bool(self.low <= value <= self.high)


def higher_is_better(metric: str) -> bool:
    """The good direction of ``metric`` (``dice``, ``nsd``, ``hd95``, ``noc85``, ``dice_click5``, ``<metric>/<class>``).

    Raises:
        ConfigError: the metric is not one of :data:`HIGHER_IS_BETTER`.
    """
    base = metric.split("/", 1)[0].lower()
    if base.startswith("dice_click"):  # Dice after k clicks (promptable runs)
        return True
    if base not in HIGHER_IS_BETTER:
        raise ConfigError(
            f"metric {metric!r} has no known direction; use one of {sorted(HIGHER_IS_BETTER)} "
            f"(optionally as '<metric>/<class>')."
        )
    return HIGHER_IS_BETTER[base]


def _clean(values: Sequence[float] | np.ndarray, groups: Sequence[object] | np.ndarray | None) -> tuple:
    values = np.asarray(values, dtype=np.float64).ravel()
    if groups is not None:
        groups = np.asarray(groups).ravel()
        if groups.shape != values.shape:
            raise ConfigError(
                f"groups has {groups.size} entries but there are {values.size} values; give one per value."
            )
    keep = np.isfinite(values)
    values = values[keep]
    groups = groups[keep] if groups is not None else None
    if values.size == 0:
        raise ConfigError("no finite values to bootstrap (every value is missing, e.g. HD95 of empty predictions).")
    return values, groups


def _group_sums(values: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit sums and counts: one unit per value, or one per group (block bootstrap)."""
    if groups is None:
        return values, np.ones_like(values)
    _, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse).astype(np.float64)
    return sums, counts


def _resampled_means(sums: np.ndarray, counts: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_resamples`` resamples of the units (ratio of resampled sums to resampled counts)."""
    n = sums.size
    if np.all(counts == 1):
        # One draw of the whole index matrix, as scipy.stats.bootstrap does: same generator, same resamples.
        index = rng.integers(0, n, (n_resamples, n))
        return sums[index].mean(axis=-1)
    out = np.empty(n_resamples)
    step = max(1, _CHUNK // n)
    for start in range(0, n_resamples, step):
        index = rng.integers(0, n, (min(step, n_resamples - start), n))
        out[start : start + index.shape[0]] = sums[index].sum(axis=-1) / counts[index].sum(axis=-1)
    return out


def _jackknife(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Leave-one-unit-out means (the BCa acceleration)."""
    return (sums.sum() - sums) / (counts.sum() - counts)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[object] | np.ndarray | None = None,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    method: str = "percentile",
    seed: int | np.random.Generator | None = 0,
) -> Interval:
    """The mean of ``values`` with a bootstrap confidence interval.

    Args:
        values: one number per unit (e.g. per case); NaN (undefined HD95) is left out.
        groups: one label per value; when given, whole groups are resampled (block bootstrap) and the statistic is
            the mean of every value in the resample. Use it for correlated units (slices of one volume, several seeds
            of one case).
        confidence: the interval's coverage (0.95 for 95 %).
        n_resamples: bootstrap resamples.
        method: ``percentile`` or ``bca`` (bias-corrected and accelerated, Efron & Tibshirani 14.3).
        seed: seed or generator of the resampling.

    Returns:
        The :class:`Interval`. A single unit gives a zero-width interval at its value.

    Raises:
        ConfigError: an unknown method, a confidence outside (0, 1), or no finite value.
    """
    if method not in ("percentile", "bca"):
        raise ConfigError(f"bootstrap method must be 'percentile' or 'bca', got {method!r}.")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}.")
    values, groups = _clean(values, groups)
    sums, counts = _group_sums(values, groups)
    estimate = float(values.mean())
    if sums.size == 1:
        return Interval(estimate, estimate, estimate, 1, int(values.size))
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    boot = _resampled_means(sums, counts, int(n_resamples), rng)
    alpha = (1 - confidence) / 2
    if method == "percentile":
        low, high = np.percentile(boot, [100 * alpha, 100 * (1 - alpha)])
    else:
        low, high = _bca(boot, estimate, _jackknife(sums, counts), alpha)
    return Interval(estimate, float(low), float(high), int(sums.size), int(values.size))


def _bca(boot: np.ndarray, estimate: float, jackknife: np.ndarray, alpha: float) -> tuple[float, float]:
    """BCa ends, as scipy.stats.bootstrap computes them (bias from the mid-rank of the estimate, jackknife a)."""
    fraction = (np.count_nonzero(boot < estimate) + np.count_nonzero(boot <= estimate)) / (2 * boot.size)
    z0 = special.ndtri(fraction)
    deviation = jackknife.mean() - jackknife
    denominator = 6 * np.sum(deviation**2) ** 1.5
    acceleration = np.sum(deviation**3) / denominator if denominator > 0 else 0.0
    ends = []
    for tail in (alpha, 1 - alpha):
        z = special.ndtri(tail)
        level = special.ndtr(z0 + (z0 + z) / (1 - acceleration * (z0 + z)))
        ends.append(np.percentile(boot, 100 * level) if np.isfinite(level) else np.nan)
    if not all(np.isfinite(ends)):  # degenerate resamples (all equal): fall back to the percentile interval
        ends = list(np.percentile(boot, [100 * alpha, 100 * (1 - alpha)]))
    return float(ends[0]), float(ends[1])


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    groups: Sequence[object] | np.ndarray | None = None,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    method: str = "percentile",
    seed: int | np.random.Generator | None = 0,
) -> Interval:
    """Mean of ``a - b`` over paired units (same case, same seed), with its bootstrap CI.

    Pairs where either value is NaN are dropped. ``groups`` as in :func:`bootstrap_ci` (e.g. the case of each pair
    when each case appears once per seed).

    Raises:
        ConfigError: ``a`` and ``b`` differ in length, or no pair is complete.
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ConfigError(f"paired values must have the same length, got {a.size} and {b.size}.")
    return bootstrap_ci(a - b, groups, confidence, n_resamples, method, seed)


def wilcoxon_p(differences: Sequence[float] | np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (NaN dropped; zero differences discarded).

    Every difference zero means the arms agree exactly: p = 1. scipy chooses the exact null distribution for small
    samples (with 4 cases the smallest possible p is 0.125: a benchmark on few cases cannot be significant).

    Raises:
        ConfigError: no finite difference.
    """
    d = np.asarray(differences, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise ConfigError("no finite paired differences for the Wilcoxon test.")
    if np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order; NaN stays NaN.

    With the ``m`` finite p-values sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``.
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    if finite.size == 0:
        return adjusted
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ConfigError(f"p-values must lie in [0, 1], got {p[finite].tolist()}.")
    order = finite[np.argsort(p[finite], kind="stable")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def verdict(interval: Interval, metric: str) -> str:
    """``win`` (arm a better), ``loss`` (worse) or ``tie`` (the CI of ``a - b`` covers 0) for ``metric``."""
    if interval.covers(0.0):
        return "tie"
    better = interval.estimate > 0 if higher_is_better(metric) else interval.estimate < 0
    return "win" if better else "loss"


def decide(interval: Interval, p_holm: float, metric: str, alpha: float = 0.05) -> str:
    """``win`` / ``loss`` / ``tie`` of arm a against arm b under both criteria (Jeong et al.; medseg issue 19).

    ``win`` iff the CI of ``a - b`` excludes 0 in ``metric``'s good direction and the Holm-corrected p-value is below
    ``alpha``; ``loss`` iff it excludes 0 in the bad direction and p is below ``alpha``; ``tie`` otherwise (a CI that
    covers 0, or a CI that excludes it while the rank test, corrected for the family, does not agree). A NaN p
    (no test possible) is a tie.

    Raises:
        ConfigError: ``alpha`` outside (0, 1), or a metric with no known direction.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"benchmark.statistics.alpha must lie in (0, 1), got {alpha}.")
    by_ci = verdict(interval, metric)
    significant = bool(np.isfinite(p_holm) and p_holm < alpha)
    return by_ci if significant else "tie"
