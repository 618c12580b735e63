"""``medseg benchmark experiment=NAME``: the grid of arms x label fractions x seeds, tuned fairly, with statistics.

Steps, each resumable (a finished run is never retrained; an interrupted one continues from its ``last.ckpt``):

1. every arm's learning-rate search (same candidates, same step budget), chosen on validation Dice only; arms that
   cannot be searched (nnU-Net, or a baseline with ``search: false``) keep their own learning rate, and
   ``lr_search.csv`` and the report say so;
2. every arm x label fraction x seed with its chosen learning rate, evaluated on the test cases;
3. the tables (``per_case.csv``, ``summary.csv``, ``comparisons.csv``, ``cost.csv``, ``lr_search.csv``), plots and
   ``report.md`` in ``<results_dir>/benchmarks/<experiment>/`` (``benchmark.output_dir``).

Budgets: equal optimisation steps (``benchmark.match=steps``, the default), or equal training compute
(``benchmark.match=compute``): each arm's FLOPs per step are counted once (:mod:`medseg.benchmark.compute`) and it
trains ``benchmark.budget_flops / flops_per_step`` steps (``budget_flops`` null: ``trainer.max_steps`` x the first
counted arm's FLOPs per step); an arm whose FLOPs are unknown beforehand (nnU-Net plans its own network in the run)
keeps ``trainer.max_steps``, and ``cost.csv``'s ``matched_by`` says which arms were matched how.

Jobs are ``medseg train`` runs launched through Hydra's launcher (:mod:`medseg.benchmark.launch`): in this process by
default, in parallel with ``launcher=joblib``, on SLURM with ``launcher=submitit_slurm``. A crashed run is recorded
(``job.json``, the report's "Failed runs") and the others go on. Overrides other than ``benchmark.*`` and the
launcher's apply to every run (e.g. ``trainer.max_steps=20``); ``benchmark.*`` change the grid (e.g.
``benchmark.seeds=[0]``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from medseg.benchmark.compute import arm_compute, compute_matched_steps
from medseg.benchmark.grid import FINAL, NOT_SEARCHED, BenchmarkSettings, Job, final_jobs, search_jobs
from medseg.benchmark.jobs import read_job, search_done
from medseg.benchmark.launch import launch_jobs
from medseg.benchmark.outputs import write_outputs
from medseg.config import CONFIG_DIR
from medseg.console import wide_console
from medseg.errors import ConfigError
from medseg.launch import check_config
from medseg.workflows.run_folder import finished_summary

__all__ = ["OUTPUTS", "load_settings", "run_benchmark"]

OUTPUTS = ("per_case.csv", "summary.csv", "comparisons.csv", "cost.csv", "lr_search.csv", "report.md")
_MASTER_ONLY = ("launcher=", "hydra.", "+hydra.", "~hydra.")
_GRID_ONLY = ("benchmark.", "+benchmark.", "~benchmark.")


def _compose(overrides: Sequence[str]):
    check_config(CONFIG_DIR, "train", list(overrides))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        defaults = compose("benchmark")
    HydraConfig.instance().set_config(cfg)
    return cfg, defaults


def load_settings(overrides: Sequence[str]) -> tuple[BenchmarkSettings, Any]:
    """The benchmark settings and the composed ``medseg train`` config of ``experiment=NAME <overrides>``.

    Raises:
        ConfigError: no ``experiment=`` override, or the settings are invalid (see :class:`BenchmarkSettings`).
    """
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    if not names:
        raise ConfigError("medseg benchmark needs an experiment, e.g. `medseg benchmark experiment=bench_mni_tissue`.")
    cfg, defaults = _compose(overrides)
    if "benchmark" not in cfg:
        raise ConfigError(
            f"conf/experiment/{names[-1]}.yaml has no `benchmark:` section (arms, label_fractions, seeds)."
        )
    for open_key in ("arms", "baselines"):  # free-form maps; every other key must exist in conf/benchmark.yaml
        OmegaConf.set_struct(defaults[open_key], False)
    try:
        merged = OmegaConf.merge(defaults, cfg.benchmark)
    except Exception as err:  # omegaconf's ConfigKeyError: a misspelt key
        raise ConfigError(f"benchmark section of experiment {names[-1]}: {' '.join(str(err).split())}") from None
    return BenchmarkSettings.from_config(names[-1], merged), cfg


def _arm_facts(settings: BenchmarkSettings, extra: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each arm's composed step budget, images per step, FLOPs per step and (compute-matched) steps; equal budgets
    are checked here."""
    facts: dict[str, dict[str, Any]] = {}
    cache: dict[str, Any] = {}
    for arm in settings.arms:
        cfg, _ = _compose([f"experiment={settings.experiment}", *arm.overrides, *extra])
        batch = OmegaConf.select(cfg, "data.batch_size", default=1)
        samples = OmegaConf.select(cfg, "data.sampling.num_samples", default=1) or 1
        compute = arm_compute(cfg, cache)
        facts[arm.name] = {
            "max_steps": int(cfg.trainer.max_steps), "samples_per_step": int(batch) * int(samples),
            "flops_per_step": compute.flops_per_step, "note": compute.note, "matched_by": "steps",
        }  # fmt: skip
    budgets = {name: (f["max_steps"], f["samples_per_step"]) for name, f in facts.items()}
    if len(set(budgets.values())) > 1:  # by compute too: the budget is set by trainer.max_steps at an equal batch
        raise ConfigError(
            f"the arms do not have the same training budget (max_steps, images per step): {budgets}; a fair benchmark "
            f"needs equal budgets, so set trainer.max_steps and data.* in the experiment, not per arm."
        )
    if settings.match == "compute":
        _match_compute(settings, facts)
    return facts


def _match_compute(settings: BenchmarkSettings, facts: dict[str, dict[str, Any]]) -> None:
    """Give every arm whose FLOPs are counted the steps that spend ``benchmark.budget_flops``."""
    counted = [f for f in facts.values() if f["flops_per_step"]]
    if not counted:
        raise ConfigError(
            "benchmark.match=compute, but no arm's FLOPs per step could be counted: "
            + "; ".join(f"{name}: {f['note']}" for name, f in facts.items())
            + ". Use benchmark.match=steps."
        )
    budget = settings.budget_flops or counted[0]["max_steps"] * counted[0]["flops_per_step"]
    for fact in facts.values():
        if fact["flops_per_step"]:
            fact.update(
                max_steps=compute_matched_steps(fact["flops_per_step"], budget, fact["max_steps"]),
                matched_by="compute",
            )
    settings.budget_flops = float(budget)


def _choose_lrs(
    settings: BenchmarkSettings, jobs: list[Job], runs_dir: Path
) -> tuple[dict[str, float | None], pd.DataFrame]:
    """Each arm's learning rate with the best validation metric (ties: the first candidate; ``None`` for an arm that
    is not searched: its own), and the search table (with a ``not searched`` row per such arm)."""
    chosen: dict[str, float | None] = {arm.name: None for arm in settings.arms if not arm.search}
    if not settings.searched:
        chosen.update({arm.name: settings.lr_values[0] for arm in settings.arms if arm.search})
    rows = []
    for job in jobs:
        record = read_job(runs_dir / job.subdir) or {}
        value = (record.get("metrics") or {}).get(settings.search_metric)
        rows.append({
            "arm": job.arm, "lr": job.lr, settings.search_metric: value, "status": record.get("status", "missing"),
            "wall_time_s": record.get("wall_time_s"), "run_dir": str(runs_dir / job.subdir), "note": "",
        })  # fmt: skip
    rows += [
        {"arm": arm.name, "lr": None, settings.search_metric: None, "status": NOT_SEARCHED, "wall_time_s": None,
         "run_dir": "", "note": _not_searched_note(arm)}
        for arm in settings.arms if not arm.search
    ]  # fmt: skip
    table = pd.DataFrame(rows)
    if table.empty:
        return chosen, table
    for arm, group in table[table["status"] != NOT_SEARCHED].groupby("arm", sort=False):
        done = group[group[settings.search_metric].notna()]
        if not done.empty:
            chosen[arm] = float(done.loc[done[settings.search_metric].astype(float).idxmax(), "lr"])
    table["chosen"] = [
        status != NOT_SEARCHED and chosen.get(a) == lr
        for a, lr, status in zip(table["arm"], table["lr"], table["status"])
    ]
    return chosen, table


def _not_searched_note(arm: Any) -> str:
    if arm.nnunet:
        return (
            "nnU-Net arm: nnU-Net's own optimiser and learning rate (SGD, 1e-2 unless nnunet.lr); its runs report "
            "no val/dice_resampled to search on"
        )
    return "search: false in benchmark.baselines: the arm's own learning rate (task.optimizer.lr)"


def _failure(job: Job, runs_dir: Path, reason: str | None = None) -> dict[str, Any]:
    record = read_job(runs_dir / job.subdir) or {}
    error = reason or record.get("error") or "no job.json: the job did not start, or was killed before it ended"
    return {"arm": job.arm, "phase": job.phase, "run_dir": str(runs_dir / job.subdir), "error": error}


def run_benchmark(overrides: Sequence[str] = ()) -> int:
    """Run (or resume) the benchmark of ``experiment=NAME`` and write its tables, plots and report.

    Returns:
        0 when every run finished, 1 when some failed (they are listed in ``report.md``; re-running retries them).

    Raises:
        ConfigError: a missing experiment, invalid settings, unequal budgets, or an override that does not compose.
    """
    console = wide_console()
    overrides = [o for o in overrides if o not in ("-m", "--multirun")]
    settings, cfg = load_settings(overrides)
    output_dir = (
        settings.output_dir or Path(str(cfg.paths.results_dir)) / "benchmarks" / settings.experiment
    ).resolve()
    runs_dir = output_dir / "runs"
    master = [o for o in overrides if not o.startswith(_GRID_ONLY)]
    extra = [o for o in master if not o.startswith(("experiment=", *_MASTER_ONLY))]
    facts = _arm_facts(settings, extra)
    steps = {name: fact["max_steps"] for name, fact in facts.items()}
    by_compute = settings.match == "compute"
    started = time.perf_counter()

    searches = search_jobs(settings, extra, steps if by_compute else next(iter(steps.values())))
    todo = [job for job in searches if not search_done(runs_dir / job.subdir, settings.search_metric)]
    console.rule(f"benchmark {settings.experiment}: learning-rate search, {len(todo)} of {len(searches)} runs to do")
    launch_jobs(todo, master, runs_dir)
    chosen, search_table = _choose_lrs(settings, searches, runs_dir)
    failures = [
        _failure(job, runs_dir) for job in searches if not search_done(runs_dir / job.subdir, settings.search_metric)
    ]

    finals = final_jobs(settings, chosen, extra, steps if by_compute else None)
    todo = [job for job in finals if finished_summary(runs_dir / job.subdir, steps[job.arm]) is None]
    console.rule(f"benchmark {settings.experiment}: final runs, {len(todo)} of {len(finals)} to do")
    launch_jobs(todo, master, runs_dir, first_index=len(searches))
    finished = []
    for job in finals:
        summary = finished_summary(runs_dir / job.subdir, steps[job.arm])
        if summary is None:
            failures.append(_failure(job, runs_dir))
            continue
        finished.append({"job": job, "summary": summary, "record": read_job(runs_dir / job.subdir)})
    no_lr = "no learning rate: every search run of this arm failed"
    failures += [
        {"arm": arm.name, "phase": FINAL, "run_dir": str(runs_dir / arm.name), "error": no_lr}
        for arm in settings.arms
        if arm.name not in chosen
    ]
    first = next(iter(facts.values()))
    paths = write_outputs(
        output_dir, settings, finished, search_table, failures,
        facts={"max_steps": first["max_steps"] if not by_compute else steps,
               "samples_per_step": first["samples_per_step"], "wall_time_s": time.perf_counter() - started,
               "chosen_lr": chosen, "device": _device(cfg), "command": "medseg benchmark " + " ".join(overrides),
               "match": settings.match, "budget_flops": settings.budget_flops,
               "not_searched": {a.name: _not_searched_note(a) for a in settings.arms if not a.search}},
        compute=facts,
    )  # fmt: skip
    for failure in failures:
        console.print(f"[red]failed[/red] {failure['arm']} ({failure['phase']}): {failure['error']}")
    console.print(
        f"benchmark {settings.experiment}: {len(finished)} of {len(finals)} runs finished; report: {paths['report.md']}"
    )
    return 1 if failures else 0


def _device(cfg: Any) -> str:
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return accelerator
