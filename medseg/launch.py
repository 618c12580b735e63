"""Running a Hydra entry point (``medseg train``, ``medseg evaluate``) from the ``medseg`` command line.

Hydra reports a config mistake (an unknown group option, a misspelt key, a missing ``???`` value) well, but only after
printing a stack trace of its own internals, or, for a missing value, deep inside the object being built. The verbs
compose the config first with the same overrides (every combination of a ``-m`` sweep) and turn any such mistake into
a :class:`~medseg.errors.ConfigError` that the CLI prints on one line; only then is Hydra run for real. For
``medseg train`` this also checks the values Lightning would refuse with a traceback (``trainer.max_steps=-5``) and
that the run folder can be created, before Hydra creates it: a refused command leaves no trace.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from medseg.errors import ConfigError
from medseg.paths import check_output_folder
from medseg.runs import check_train_config

__all__ = ["MAX_CHECKED_JOBS", "check_config", "run_hydra_entry", "split_hydra_flags"]

MAX_CHECKED_JOBS = 64  # sweeps larger than this are checked value by value, not combination by combination
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}  # fmt: skip


def split_hydra_flags(argv: Sequence[str]) -> tuple[list[str], list[str], bool]:
    """Separate Hydra's own flags (``-m``, ``--cfg job``...) from the ``key=value`` overrides.

    Returns:
        ``(flags, overrides, multirun)``.
    """
    flags, overrides, multirun = [], [], False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-m", "--multirun"):
            multirun = True
            flags.append(arg)
        elif arg.startswith("-"):
            flags.append(arg)
            if arg in _FLAGS_WITH_VALUE and i + 1 < len(args) and "=" not in args[i + 1]:
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides, multirun


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of the jobs a (multi)run would launch, as far as they can be listed (sweeps expanded)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # Hydra's OverrideParseException: the message says what is wrong
        raise ConfigError(f"cannot parse the overrides: {_one_line(err)}") from None
    axes = []
    for override in parsed:
        if multirun and override.is_sweep_override() and not override.is_hydra_override():
            if override.is_discrete_sweep():
                values = list(override.sweep_string_iterator())
                key = override.get_key_element()
                axes.append([f"{key}={value}" for value in values])
                continue
            continue  # range/interval sweeps (Optuna) are chosen by the sweeper; the base config is checked
        axes.append([override.input_line])
    if not multirun and any(o.is_sweep_override() for o in parsed):
        raise ConfigError("comma-separated values sweep over several runs: add -m (e.g. `medseg train -m ...`).")
    combos = 1
    for axis in axes:
        combos *= len(axis)
    if combos <= MAX_CHECKED_JOBS:
        return [list(job) for job in itertools.product(*axes)]
    return [[axis[min(i, len(axis) - 1)] for axis in axes] for i in range(max(len(a) for a in axes))]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def check_config(config_dir: str, config_name: str, overrides: Sequence[str], multirun: bool = False) -> None:
    """Compose the config for every job of the command and check that nothing mandatory is missing.

    Raises:
        ConfigError: an override is malformed, names an unknown group option or key, or a ``???`` value is left.
    """
    for job in _jobs(list(overrides), multirun):
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            try:
                cfg = compose(config_name=config_name, overrides=job, return_hydra_config=True)
            except HydraException as err:
                raise ConfigError(_one_line(err)) from None
        HydraConfig.instance().set_config(cfg)  # so that ${hydra:...} values resolve as in the real run
        output_dir = _job_dir(cfg, multirun)
        with open_dict(cfg):
            cfg.pop("hydra")
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(
                f"missing value{'s' if len(missing) > 1 else ''} for {', '.join(missing)}: set "
                f"{'them' if len(missing) > 1 else 'it'} on the command line, e.g. `medseg "
                f"{config_name} {missing[0]}=...`."
            )
        if config_name == "train":
            _check_train_job(cfg, output_dir)


def _job_dir(cfg: DictConfig, multirun: bool) -> Path | None:
    """The folder Hydra will create for the job (``hydra.run.dir``, or the sweep's dir and subdir), if it resolves.

    A sweep subdir may use values only the launcher sets (``${hydra.job.num}``); then the sweep dir is what is known.
    """
    keys = ("hydra.sweep.dir", "hydra.sweep.subdir") if multirun else ("hydra.run.dir",)
    parts = []
    for key in keys:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception:  # an interpolation of launcher-time values
            break
        if value is None:
            break
        parts.append(str(value))
    return Path(*parts) if parts else None


def _check_train_job(cfg: DictConfig, output_dir: Path | None) -> None:
    """What ``medseg train`` would otherwise find only after Hydra created (or failed to create) the run folder."""
    check_train_config(cfg)
    if output_dir is not None:
        check_output_folder(output_dir)


def run_hydra_entry(
    entry: Callable[[], object], config_dir: str, config_name: str, argv: Sequence[str], prog: str
) -> int:
    """Check the config, then run a ``@hydra.main`` entry with ``argv`` as its command line.

    Errors raised by the run itself propagate (``HYDRA_FULL_ERROR=1``), so the CLI prints a
    :class:`~medseg.errors.MedsegError` as one line instead of Hydra's abridged traceback.
    """
    flags, overrides, multirun = split_hydra_flags(argv)
    if not any(f in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c") for f in flags):
        check_config(config_dir, config_name, overrides, multirun)
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [prog, *argv]
    try:
        entry()
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
    return 0
