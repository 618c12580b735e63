"""Whether a run is finished, and which command a run folder accepts: the decisions that read its ``summary.json``.

:mod:`medseg.runs` knows a run folder's files, lock and checkpoints. A run is finished only when what its command
wrote is still there, and that includes a complete ``summary.json``, which only the evaluation stage can judge
(:func:`medseg.evaluation.is_complete`); so the decisions built on it live here, above both:

- :func:`is_finished`: training completed and, when the command evaluated, its summary is complete.
- :func:`check_run_folder`: refuses a ``medseg train`` that would lose or mix up the run a folder holds.
- :func:`finished_summary`: the summary of a run with the same step budget, which drivers of many runs (the
  quickstart, the benchmark runner) skip when they are re-run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medseg.errors import ConfigError
from medseg.evaluation import is_complete, read_summary
from medseg.runs import SUMMARY, config_differences, holds_run, last_checkpoint, read_state, resume_mode

__all__ = ["check_run_folder", "finished_summary", "is_finished"]


def is_finished(run_dir: str | os.PathLike[str]) -> bool:
    """Whether a ``medseg train`` command completed on the run and what it wrote is still there.

    ``finished`` in ``train_state.json`` means training ended and, when the command evaluated (``evaluated: true``),
    that ``summary.json`` was written; a run whose summary has since gone (deleted, or cut short by a full disk) is
    not finished: re-running the command evaluates it again. Run folders of older versions have no state file; those
    count as finished once their ``summary.json`` is complete.
    """
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    if state:
        evaluated = not state.get("evaluated") or is_complete(run_dir / SUMMARY)
        return state.get("status") == "finished" and evaluated
    return last_checkpoint(run_dir) is not None and is_complete(run_dir / SUMMARY)


def check_run_folder(run_dir: str | os.PathLike[str], cfg: DictConfig) -> None:
    """Refuse a command that would lose or mix up the run ``run_dir`` holds; call it holding the
    :class:`~medseg.runs.RunLock`.

    Raises:
        ConfigError: the folder holds a run of another config (the first differing keys are named), a finished run
            and neither ``resume=true`` nor ``overwrite=true`` was given, or ``resume=false`` without ``overwrite``.
    """
    run_dir = Path(run_dir)
    if cfg.get("overwrite") or not holds_run(run_dir):
        return
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.is_file():
        try:
            differences = config_differences(OmegaConf.load(saved), cfg)
        except Exception as err:  # YAML or OmegaConf errors: the message says where
            raise ConfigError(
                f"{saved} cannot be read ({' '.join(str(err).split())[:160]}): restore it, or add overwrite=true to "
                f"start the run over."
            ) from None
        if differences:
            more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
            raise ConfigError(
                f"{run_dir} holds a run with another config ({'; '.join(differences[:3])}{more}): train into another "
                f"folder (another experiment, hydra.run.dir=...), or add overwrite=true to discard that run."
            )
    mode = resume_mode(cfg)
    if cfg.get("ckpt_path") or not cfg.get("fit", True):
        return
    if mode is False:
        raise ConfigError(
            f"resume=false would start {run_dir} over, but it holds a trained run: add overwrite=true to discard it, "
            f"or leave resume out to continue it."
        )
    if mode == "auto" and is_finished(run_dir):
        raise ConfigError(
            f"{run_dir} holds a finished run: add resume=true to train it further (e.g. with a larger "
            f"trainer.max_steps), overwrite=true to start it over, or re-evaluate it with `medseg evaluate "
            f"run_dir={run_dir}`."
        )


def finished_summary(run_dir: str | os.PathLike[str], max_steps: int) -> dict[str, Any] | None:
    """The summary of a run that trained ``max_steps`` steps and evaluated every test case, else ``None``.

    Drivers of many runs (the quickstart, the benchmark runner) skip such runs when re-run; a run with another step
    budget is not the same run and is trained again.
    """
    path = Path(run_dir) / SUMMARY
    if not is_complete(path):
        return None
    summary = read_summary(path)
    return summary if summary.get("steps_trained") == max_steps else None
