"""The grid of a benchmark: its arms, label fractions, seeds and learning-rate search, as ``medseg train`` jobs.

The settings are ``conf/benchmark.yaml`` merged with the ``benchmark:`` section of the experiment file (which also
holds the ``medseg train`` settings every arm shares). Each job is a list of ``medseg train`` overrides and the run
folder it writes::

    <output_dir>/runs/<arm>/search/lr_<lr>/                 learning-rate search (validation cases only)
    <output_dir>/runs/<arm>/frac_<fraction>/seed_<seed>/    final runs (evaluated on the test cases)

Search runs train at one label fraction and seed with each candidate learning rate and report the validation Dice at
the end of the budget; final runs train with the arm's chosen learning rate, never validate, and are evaluated on the
test cases with their last weights. Every arm has the same step budget (or, with ``benchmark.match=compute``, the
same training FLOPs: :mod:`medseg.benchmark.compute`) and the same number of candidates -- except arms that cannot be
searched: an nnU-Net arm (``+nnunet=2d``, :mod:`medseg.workflows.nnunet`) trains with nnU-Net's own optimiser and
learning rate (``nnunet.lr``) and reports no ``val/dice_resampled``, so it is never searched (a baseline can also say
``search: false``), and its final runs get no ``task.optimizer.lr``.
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

__all__ = ["MATCHES", "NOT_SEARCHED", "Arm", "BenchmarkSettings", "Job", "final_jobs", "parse_arms", "search_jobs"]

SEARCH, FINAL = "search", "final"
MATCHES = ("steps", "compute")  # benchmark.match: equal optimisation steps, or equal training FLOPs
NOT_SEARCHED = "not searched"


@dataclass(frozen=True)
class Arm:
    """One model configuration of the comparison.

    Attributes:
        name: folder-safe name, e.g. ``litemedsam__lora__pretrained``.
        overrides: ``medseg train`` overrides that make this arm.
        factors: the grid's ``{key: value}`` (``init``, ``adapter``, ...); empty for a baseline.
        baseline: a CNN baseline (trained from scratch), not part of the grid.
        search: whether the arm takes part in the learning-rate search (False: it trains with its own learning rate).
    """

    name: str
    overrides: tuple[str, ...]
    factors: Mapping[str, str] = field(default_factory=dict)
    baseline: bool = False
    search: bool = True

    @property
    def nnunet(self) -> bool:
        """Whether the arm is an nnU-Net run (an ``nnunet=`` config-group override, e.g. ``+nnunet=2d``)."""
        return any(o.lstrip("+").startswith("nnunet=") for o in self.overrides)


@dataclass(frozen=True)
class Job:
    """One ``medseg train`` run of the benchmark."""

    arm: str
    phase: str  # "search" or "final"
    label_fraction: float
    seed: int
    lr: float | None  # None: the arm's own learning rate (not searched)
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
    match: str = "steps"
    budget_flops: float | None = None

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
        match = str(cfg.get("match") or "steps")
        if match not in MATCHES:
            raise ConfigError(f"benchmark.match must be one of {list(MATCHES)}, got {match!r}.")
        budget = cfg.get("budget_flops")
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise ConfigError(
                f"benchmark.budget_flops must be a positive number of FLOPs (e.g. 1.0e15), got {budget!r}."
            )
        alpha = (cfg.get("statistics") or {}).get("alpha", 0.05)
        if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
            raise ConfigError(f"benchmark.statistics.alpha must lie in (0, 1), e.g. 0.05, got {alpha!r}.")
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
            match=match,
            budget_flops=float(budget) if budget is not None else None,
        )

    @property
    def searched(self) -> bool:
        """Whether learning rates are searched (more than one candidate, and an arm that can be searched)."""
        return len(self.lr_values) > 1 and any(arm.search for arm in self.arms)


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
        baselines: ``{name: [overrides]}`` of baselines, or ``{name: {overrides: [...], search: false}}`` for one that
            keeps its own learning rate. An nnU-Net baseline (``[+nnunet=2d, ...]``) is never searched.

    Raises:
        ConfigError: no arm at all, an empty list of values, two arms with one name, or ``search: true`` on an
            nnU-Net baseline.
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
    for name, spec in baselines.items():
        arms.append(_baseline(str(name), spec))
    if not arms:
        raise ConfigError("the benchmark has no arms: set benchmark.arms (a grid) and/or benchmark.baselines.")
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"two benchmark arms are both named {duplicates}; rename a baseline.")
    return arms


def _baseline(name: str, spec: Any) -> Arm:
    search = None
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"overrides", "search"})
        if unknown:
            raise ConfigError(
                f"benchmark.baselines.{name} has unknown keys {unknown}; use overrides: [...], search: bool."
            )
        search, spec = spec.get("search"), spec.get("overrides")
    if isinstance(spec, str) or not isinstance(spec, (list, tuple, ListConfig, type(None))):
        raise ConfigError(f"benchmark.baselines.{name} must be a list of overrides, e.g. [model=unet_2d].")
    arm = Arm(_safe(name), tuple(str(o) for o in spec or ()), {}, baseline=True)
    if arm.nnunet and search:
        raise ConfigError(
            f"benchmark.baselines.{name} is an nnU-Net arm, which uses nnU-Net's own learning rate (nnunet.lr) and "
            f"reports no val/dice_resampled: drop search: true."
        )
    if search is not None and not isinstance(search, bool):
        raise ConfigError(f"benchmark.baselines.{name}.search must be true or false, got {search!r}.")
    return Arm(
        arm.name, arm.overrides, {}, baseline=True, search=bool(search if search is not None else not arm.nnunet)
    )


def _format_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _job(settings: BenchmarkSettings, arm: Arm, phase: str, fraction: float, seed: int, lr: float | None,
         extra: Sequence[str], subdir: str, max_steps: int) -> Job:  # fmt: skip
    phase_overrides = (
        ["evaluate=false", "trainer.check_val_every_n_epoch=null", f"+trainer.val_check_interval={max_steps}"]
        if phase == SEARCH
        else ["evaluate=true", "eval_ckpt=last", "trainer.check_val_every_n_epoch=1000000"]
    )
    lr_override = [f"task.optimizer.lr={lr}"] if lr is not None else []
    overrides = (
        f"experiment={settings.experiment}", *arm.overrides, *extra, f"data.label_fraction={fraction}",
        f"seed={seed}", *lr_override, *phase_overrides, f"hydra.sweep.subdir={subdir}",
    )  # fmt: skip
    return Job(arm.name, phase, fraction, seed, lr, subdir, overrides)


def search_jobs(settings: BenchmarkSettings, extra: Sequence[str], max_steps: int | Mapping[str, int]) -> list[Job]:
    """The learning-rate search: every searchable arm x every candidate, at the search fraction and seed (none if one
    lr). ``max_steps``: one number, or each arm's (a compute-matched benchmark gives arms different step counts)."""
    if not settings.searched:
        return []
    fraction, seed = settings.search_fraction, settings.search_seed
    jobs = []
    for arm in settings.arms:
        if not arm.search:
            continue
        steps = max_steps[arm.name] if isinstance(max_steps, Mapping) else max_steps
        arm_extra = [*extra, f"trainer.max_steps={steps}"] if isinstance(max_steps, Mapping) else list(extra)
        for lr in settings.lr_values:
            subdir = f"{arm.name}/search/lr_{_format_lr(lr)}"
            jobs.append(_job(settings, arm, SEARCH, fraction, seed, lr, arm_extra, subdir, steps))
    return jobs


def final_jobs(
    settings: BenchmarkSettings,
    chosen_lr: Mapping[str, float | None],
    extra: Sequence[str],
    max_steps: Mapping[str, int] | None = None,
) -> list[Job]:
    """Every arm with a chosen learning rate (``None``: its own, not searched) x label fraction x seed.

    ``max_steps``: each arm's step budget when arms are matched by compute (added as ``trainer.max_steps``); ``None``:
    the experiment's ``trainer.max_steps`` for every arm.
    """
    jobs = []
    for arm in settings.arms:
        if arm.name not in chosen_lr:
            continue
        arm_extra = [*extra, f"trainer.max_steps={max_steps[arm.name]}"] if max_steps else list(extra)
        for fraction in settings.label_fractions:
            for seed in settings.seeds:
                subdir = f"{arm.name}/frac_{fraction:g}/seed_{seed}"
                jobs.append(_job(settings, arm, FINAL, fraction, seed, chosen_lr[arm.name], arm_extra, subdir, 0))
    return jobs
