"""The grid of a benchmark: its arms, label fractions, seeds and learning-rate search, as ``medseg train`` jobs.

The settings are ``conf/benchmark.yaml`` merged with the ``benchmark:`` section of the experiment file (which also
holds the ``medseg train`` settings every arm shares). Each job is a list of ``medseg train`` overrides and the run
folder it writes::

    <output_dir>/runs/<arm>/search/lr_<lr>/                 learning-rate search (validation cases only)
    <output_dir>/runs/<arm>/frac_<fraction>/seed_<seed>/    final runs (evaluated on the test cases)

Search runs train at one label fraction and seed with each candidate learning rate and report the validation Dice at
the end of the budget; final runs train with the arm's chosen learning rate, never validate, and are evaluated on the
test cases with their last weights. Every arm has the same step budget and the same number of candidates.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from medseg.benchmark.stats import higher_is_better
from medseg.errors import ConfigError

__all__ = ["Arm", "BenchmarkSettings", "Job", "final_jobs", "parse_arms", "search_jobs"]

SEARCH, FINAL = "search", "final"


@dataclass(frozen=True)
class Arm:
    """One model configuration of the comparison.

    Attributes:
        name: folder-safe name, e.g. ``litemedsam__lora__pretrained``.
        overrides: ``medseg train`` overrides that make this arm.
        factors: the grid's ``{key: value}`` (``init``, ``adapter``, ...); empty for a baseline.
        baseline: a CNN baseline (trained from scratch), not part of the grid.
    """

    name: str
    overrides: tuple[str, ...]
    factors: Mapping[str, str] = field(default_factory=dict)
    baseline: bool = False


@dataclass(frozen=True)
class Job:
    """One ``medseg train`` run of the benchmark."""

    arm: str
    phase: str  # "search" or "final"
    label_fraction: float
    seed: int
    lr: float
    subdir: str  # run folder relative to <output_dir>/runs
    overrides: tuple[str, ...]


@dataclass
class BenchmarkSettings:
    """The merged ``benchmark`` settings (see ``conf/benchmark.yaml`` for each field's meaning)."""

    experiment: str
    arms: list[Arm]
    label_fractions: list[float]
    seeds: list[int]
    lr_values: list[float]
    search_fraction: float
    search_seed: int
    search_metric: str
    metrics: list[str]
    primary_metric: str
    statistics: dict[str, Any]
    question: str
    limitations: list[str]
    output_dir: Path | None

    @classmethod
    def from_config(cls, experiment: str, node: DictConfig | Mapping[str, Any]) -> BenchmarkSettings:
        """Validate the merged ``benchmark`` node.

        Raises:
            ConfigError: no arms, an empty or invalid list of fractions/seeds/learning rates, or a bad metric.
        """
        cfg = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        arms = parse_arms(cfg.get("arms") or {}, cfg.get("baselines") or {})
        fractions = [float(f) for f in _list(cfg, "label_fractions")]
        if any(not 0 < f <= 1 for f in fractions):
            raise ConfigError(f"benchmark.label_fractions must lie in (0, 1], got {fractions}.")
        seeds = [int(s) for s in _list(cfg, "seeds")]
        search = cfg.get("lr_search") or {}
        lrs = [float(v) for v in _list(search, "values", "benchmark.lr_search.values")]
        if any(v <= 0 for v in lrs):
            raise ConfigError(f"benchmark.lr_search.values must be positive learning rates, got {lrs}.")
        metrics = [str(m) for m in _list(cfg, "metrics")]
        for metric in metrics:
            higher_is_better(metric)
        primary = str(cfg.get("primary_metric") or metrics[0])
        if primary not in metrics:
            raise ConfigError(f"benchmark.primary_metric={primary} must be one of benchmark.metrics={metrics}.")
        search_fraction = search.get("label_fraction")
        search_seed = search.get("seed")
        return cls(
            experiment=experiment,
            arms=arms,
            label_fractions=sorted(set(fractions)),
            seeds=list(dict.fromkeys(seeds)),
            lr_values=list(dict.fromkeys(lrs)),
            search_fraction=float(search_fraction) if search_fraction is not None else max(fractions),
            search_seed=int(search_seed) if search_seed is not None else seeds[0],
            search_metric=str(search.get("metric") or "val/dice_resampled"),
            metrics=metrics,
            primary_metric=primary,
            statistics=dict(cfg.get("statistics") or {}),
            question=str(cfg.get("question") or ""),
            limitations=[str(x) for x in cfg.get("limitations") or []],
            output_dir=Path(cfg["output_dir"]) if cfg.get("output_dir") else None,
        )

    @property
    def searched(self) -> bool:
        """Whether learning rates are searched (more than one candidate)."""
        return len(self.lr_values) > 1


def _list(cfg: Mapping[str, Any], key: str, name: str | None = None) -> list[Any]:
    value = cfg.get(key)
    if not isinstance(value, (list, tuple, ListConfig)) or not value:
        raise ConfigError(f"{name or 'benchmark.' + key} must be a non-empty list, got {value!r}.")
    return list(value)


def _safe(value: Any) -> str:
    return str(value).replace("/", "-").replace("=", "-").replace(" ", "")


def parse_arms(grid: Mapping[str, Sequence[Any]], baselines: Mapping[str, Sequence[str]]) -> list[Arm]:
    """Every combination of the grid's values as an arm, then the named baselines.

    Args:
        grid: ``{override key: [values]}``, e.g. ``{init: [pretrained, scratch], adapter: [lora, full]}``; the arm
            is named by its values joined with ``__`` in the grid's key order.
        baselines: ``{name: [overrides]}`` of CNN baselines.

    Raises:
        ConfigError: no arm at all, an empty list of values, or two arms with one name.
    """
    arms = []
    keys = list(grid)
    for key in keys:
        if isinstance(grid[key], (str, int, float)) or not grid[key]:
            raise ConfigError(f"benchmark.arms.{key} must be a non-empty list of values, got {grid[key]!r}.")
    for values in itertools.product(*(list(grid[k]) for k in keys)) if keys else []:
        factors = {k: str(v) for k, v in zip(keys, values)}
        name = "__".join(_safe(v) for v in values)
        arms.append(Arm(name, tuple(f"{k}={v}" for k, v in factors.items()), factors))
    for name, overrides in baselines.items():
        if isinstance(overrides, str):
            raise ConfigError(f"benchmark.baselines.{name} must be a list of overrides, e.g. [model=unet_2d].")
        arms.append(Arm(_safe(name), tuple(str(o) for o in overrides or ()), {}, baseline=True))
    if not arms:
        raise ConfigError("the benchmark has no arms: set benchmark.arms (a grid) and/or benchmark.baselines.")
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"two benchmark arms are both named {duplicates}; rename a baseline.")
    return arms


def _format_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _job(settings: BenchmarkSettings, arm: Arm, phase: str, fraction: float, seed: int, lr: float, extra: Sequence[str],
         subdir: str, max_steps: int) -> Job:  # fmt: skip
    phase_overrides = (
        ["evaluate=false", "trainer.check_val_every_n_epoch=null", f"+trainer.val_check_interval={max_steps}"]
        if phase == SEARCH
        else ["evaluate=true", "eval_ckpt=last", "trainer.check_val_every_n_epoch=1000000"]
    )
    overrides = (
        f"experiment={settings.experiment}", *arm.overrides, *extra, f"data.label_fraction={fraction}",
        f"seed={seed}", f"task.optimizer.lr={lr}", *phase_overrides, f"hydra.sweep.subdir={subdir}",
    )  # fmt: skip
    return Job(arm.name, phase, fraction, seed, lr, subdir, overrides)


def search_jobs(settings: BenchmarkSettings, extra: Sequence[str], max_steps: int) -> list[Job]:
    """The learning-rate search: every arm x every candidate, at the search fraction and seed (none if one lr)."""
    if not settings.searched:
        return []
    fraction, seed = settings.search_fraction, settings.search_seed
    return [
        _job(settings, arm, SEARCH, fraction, seed, lr, extra, f"{arm.name}/search/lr_{_format_lr(lr)}", max_steps)
        for arm in settings.arms
        for lr in settings.lr_values
    ]


def final_jobs(settings: BenchmarkSettings, chosen_lr: Mapping[str, float], extra: Sequence[str]) -> list[Job]:
    """Every arm with a chosen learning rate x label fraction x seed."""
    jobs = []
    for arm in settings.arms:
        if arm.name not in chosen_lr:
            continue
        for fraction in settings.label_fractions:
            for seed in settings.seeds:
                subdir = f"{arm.name}/frac_{fraction:g}/seed_{seed}"
                jobs.append(_job(settings, arm, FINAL, fraction, seed, chosen_lr[arm.name], extra, subdir, 0))
    return jobs
