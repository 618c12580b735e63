"""Run a list of ``medseg train`` jobs through the Hydra launcher that ``conf/train.yaml`` selects.

This is what ``medseg train -m`` does inside Hydra (``BasicSweeper`` -> ``Launcher.launch``), minus the sweeper: the
benchmark's jobs are not a Cartesian product of one override set (arms differ in model, adapter, init, and each arm
has its own chosen learning rate), and finished jobs must be left out before launching. So the runner composes the
master config as Hydra would (``launcher=joblib`` or ``launcher=submitit_slurm`` select the plugin, ``hydra.launcher.*``
tune it; none: Hydra's basic launcher, one job after the other in this process) and hands the launcher the explicit
list of job overrides. Each job is then composed, given its own run folder (``hydra.sweep.dir`` /
``hydra.sweep.subdir``), logged and saved (``.hydra/``) by Hydra itself, locally or on SLURM, and a job that raises is
marked failed while the others go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.types import HydraContext

from medseg.benchmark.grid import Job
from medseg.benchmark.jobs import train_job
from medseg.config import CONFIG_DIR
from medseg.errors import ConfigError

__all__ = ["launch_jobs"]


def launch_jobs(jobs: Sequence[Job], master_overrides: Sequence[str], runs_dir: Path, first_index: int = 0) -> list:
    """Launch ``jobs`` with the launcher of ``conf/train.yaml`` composed with ``master_overrides``.

    Args:
        jobs: the jobs to run (their overrides include ``hydra.sweep.subdir``).
        master_overrides: the command line's overrides that configure the launcher (``launcher=...``,
            ``hydra.launcher.*``) and the experiment.
        runs_dir: ``hydra.sweep.dir`` of every job.
        first_index: Hydra job number of the first job (unique across the benchmark's launches).

    Returns:
        Hydra's ``JobReturn`` per job (``status`` COMPLETED or FAILED); the runner reads the outcome from the jobs'
        ``job.json`` files, which exist for every launcher.

    Raises:
        ConfigError: the master config does not compose (e.g. an unknown launcher).
    """
    if not jobs:
        return []

    overrides = [*master_overrides, f"hydra.sweep.dir={runs_dir.resolve()}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            master = compose("train", overrides=overrides, return_hydra_config=True)
        except HydraException as err:
            raise ConfigError(" ".join(str(err).split())) from None
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks(master))
        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=context, task_function=train_job, config=master
        )
        return list(launcher.launch([list(job.overrides) for job in jobs], initial_job_idx=first_index))
