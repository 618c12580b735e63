"""Run folders: where a run keeps its checkpoints, and which checkpoint a re-run continues from.

A run folder is ``results/<dataset>/<model>__<adapter>__<init>/fold_<k>/`` (set by ``conf/hydra/default.yaml``)::

    .hydra/                 resolved config, overrides (Hydra)
    checkpoints/last.ckpt   end of the latest epoch: what a re-run of the same command resumes from
    checkpoints/best_*.ckpt highest validation Dice (model selection)
    logs/csv/metrics.csv    logs/tensorboard/   training curves
    predictions/            test predictions on the native grid
    summary.json            test metrics on the native grid, trainable parameters, peak memory, wall time

Re-running the same command is how a run is resumed, as in nnU-Net's ``--c``: no extra flag to remember.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError

__all__ = [
    "best_checkpoint",
    "checkpoint_dir",
    "finished_summary",
    "last_checkpoint",
    "resolve_resume",
    "select_checkpoint",
]

LAST = "last.ckpt"


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def last_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """``checkpoints/last.ckpt`` if it exists (Lightning writes it atomically at the end of each epoch)."""
    path = checkpoint_dir(run_dir) / LAST
    return path if path.is_file() else None


def best_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest ``best_*.ckpt`` (there is one: ``save_top_k: 1``), or ``None`` when validation never ran."""
    folder = checkpoint_dir(run_dir)
    candidates = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return candidates[-1] if candidates else None


def resolve_resume(run_dir: str | os.PathLike[str], resume: bool, ckpt_path: str | None) -> str | None:
    """The checkpoint ``Trainer.fit`` should continue from: an explicit path, else ``last.ckpt`` when resuming.

    Raises:
        ConfigError: ``ckpt_path`` was given but is not a file.
    """
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={ckpt_path} is not a file. Give an existing .ckpt or leave ckpt_path=null.")
        return str(ckpt_path)
    if resume:
        last = last_checkpoint(run_dir)
        return str(last) if last is not None else None
    return None


def select_checkpoint(run_dir: str | os.PathLike[str], which: str) -> Path | None:
    """``best`` (falls back to ``last`` when validation never ran), ``last``, or a path to a ``.ckpt`` file.

    Raises:
        ConfigError: a path that is not a file, or a name that is none of these.
    """
    if which == "best":
        return best_checkpoint(run_dir) or last_checkpoint(run_dir)
    if which == "last":
        return last_checkpoint(run_dir)
    path = Path(which)
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ConfigError(f"checkpoint {path} does not exist.")
        return path
    raise ConfigError(f"checkpoint must be 'best', 'last' or a path to a .ckpt file, got {which!r}.")


def finished_summary(run_dir: Path, max_steps: int) -> dict[str, Any] | None:
    """The summary of a run that trained ``max_steps`` steps and evaluated every test case, else ``None``.

    Drivers of many runs (the quickstart, the benchmark runner) skip such runs when re-run; a run with another step
    budget is not the same run and is trained again.
    """
    from medseg.evaluation import is_complete, read_summary

    path = Path(run_dir) / "summary.json"
    if not is_complete(path):
        return None
    summary = read_summary(path)
    return summary if summary.get("steps_trained") == max_steps else None
