"""Run folders: what a run keeps, which checkpoint a re-run continues from, and who may write into a run folder.

A run folder is ``results/<dataset>/<model>__<adapter>__<init>/fold_<k>/`` (set by ``conf/hydra/default.yaml``)::

    .hydra/                 config.yaml, hydra.yaml, overrides.yaml of the run (written by medseg, not by Hydra)
    .medseg.lock            held (``flock``) by the ``medseg train`` writing into the folder
    train_state.json        ``training`` while a command works on the run, ``finished`` once it completed
    checkpoints/last.ckpt   end of the latest epoch: what a re-run of the same command resumes from
    checkpoints/best_*.ckpt highest validation Dice (model selection)
    logs/csv/metrics.csv    logs/tensorboard/   training curves
    predictions/            test predictions on the native grid
    summary.json            test metrics on the native grid, trainable parameters, peak memory, wall time

Re-running the same command is how an interrupted run is resumed, as in nnU-Net's ``--c``: no flag to remember. What
was made is never lost by a second command: one holding the lock is alone in the folder, a finished run is continued
only with ``resume=true`` and started over only with ``overwrite=true``, and a command whose config differs from the
run's saved one (beyond :data:`RESUMABLE_KEYS`) is refused before it writes anything.

This module knows the folder's files, its lock and its checkpoints; whether a run is finished depends on its
``summary.json`` being complete, which only the evaluation stage can tell, so that decision and the check built on it
sit above in :mod:`medseg.workflows.run_folder`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import zipfile
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from medseg.atomic import atomic_write_json, atomic_write_text
from medseg.errors import ConfigError, WeightsError

try:
    import fcntl
except ImportError:  # not POSIX: run folders are not locked
    fcntl = None

__all__ = [
    "LAST",
    "LOCK_FILE",
    "RESUMABLE_KEYS",
    "RUN_DATA",
    "STATE_FILE",
    "SUMMARY",
    "RunLock",
    "best_checkpoint",
    "check_train_config",
    "checkpoint_dir",
    "checkpoint_problem",
    "config_differences",
    "discard_run",
    "holds_run",
    "last_checkpoint",
    "read_state",
    "resolve_resume",
    "resume_mode",
    "save_run_config",
    "select_checkpoint",
    "write_state",
]

log = logging.getLogger("medseg.runs")

LAST = "last.ckpt"
LOCK_FILE = ".medseg.lock"
STATE_FILE = "train_state.json"
SUMMARY = "summary.json"
# Keys a later command of the same run may change: how long and on what it trains, what it logs and evaluates, where
# the data lives. Everything else (data, preprocessing, model, adapter, task, seed) defines the run.
RESUMABLE_KEYS = (
    "resume", "overwrite", "fit", "evaluate", "eval_ckpt", "ckpt_path", "optimized_metric", "run_dir", "paths",
    "trainer.max_steps", "trainer.max_epochs", "trainer.check_val_every_n_epoch", "trainer.log_every_n_steps",
    "trainer.num_sanity_val_steps", "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.precision", "trainer.sync_batchnorm", "trainer.use_distributed_sampler", "trainer.default_root_dir",
    "data.num_workers", "data.persistent_workers", "data.pin_memory", "data.prefetch_factor", "data.cache",
    "callbacks.rich_progress_bar", "callbacks.model_summary", "callbacks.lr_monitor",
    "callbacks.weights_digest", "callbacks.last_checkpoint", "logger",
)  # fmt: skip
#: What prediction needs from the training data (labels, channels, resolved preprocessing), written at training time
#: so that a run folder predicts without its dataset (:mod:`medseg.inference.run_data`).
RUN_DATA = "run_data.json"
# What `overwrite=true` removes: everything a training command wrote (the lock, train.log and .hydra/ stay).
_OUTPUTS = ("checkpoints", "logs", "predictions", "weights_digest", "nnunet", SUMMARY, STATE_FILE, RUN_DATA)


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def last_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """``checkpoints/last.ckpt`` if it exists (written atomically at the end of each epoch)."""
    path = checkpoint_dir(run_dir) / LAST
    return path if path.is_file() else None


def best_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest ``best_*.ckpt`` (there is one: ``save_top_k: 1``), or ``None`` when validation never ran."""
    folder = checkpoint_dir(run_dir)
    candidates = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return candidates[-1] if candidates else None


def holds_run(run_dir: str | os.PathLike[str]) -> bool:
    """Whether the folder holds (part of) a trained run: a checkpoint or a state file."""
    folder = checkpoint_dir(run_dir)
    return (Path(run_dir) / STATE_FILE).is_file() or (folder.is_dir() and any(folder.glob("*.ckpt")))


def read_state(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``train_state.json`` of the run (see :func:`write_state`); empty when there is none or it cannot be read."""
    try:
        state = json.loads((Path(run_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(run_dir: str | os.PathLike[str], status: str, **facts: Any) -> None:
    """Record ``status`` (``training`` or ``finished``) and ``facts`` in ``train_state.json``, atomically."""
    record = {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **facts}
    atomic_write_json(Path(run_dir) / STATE_FILE, record)


def discard_run(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete what training and evaluation wrote into ``run_dir`` (``overwrite=true``); returns what was removed."""
    removed = []
    for name in _OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.medseg.lock`` for as long as a command works on the run.

    The kernel releases the lock when its process ends, however it ends, so a killed run never leaves a stale lock;
    the file holds the holder's PID and host only to name it in the refusal.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        path = self.run_dir / LOCK_FILE
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(
                f"cannot write into the run folder {self.run_dir}: {err.strerror or err}. Make it a writable folder, "
                f"or train into another one (MEDSEG_RESULTS, hydra.run.dir)."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"PID {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
            raise ConfigError(
                f"the run folder {self.run_dir} is in use by another `medseg train` ({who}): wait until it ends "
                f"(or stop it), or train into another folder."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _task_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as Hydra saves it in ``.hydra/config.yaml``: unresolved, without the ``hydra`` node."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    return container


def config_differences(saved: DictConfig, cfg: DictConfig, allowed: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """``key: saved -> new`` for every key that differs between two run configs, except the ``allowed`` ones."""
    old, new = _flat(_task_config(saved)), _flat(_task_config(cfg))
    keys = sorted(set(old) | set(new))
    missing = "(absent)"
    return [
        f"{key}: {old.get(key, missing)} -> {new.get(key, missing)}"
        for key in keys
        if old.get(key, missing) != new.get(key, missing)
        and not any(key == a or key.startswith(f"{a}.") for a in allowed)
    ]


def save_run_config(run_dir: str | os.PathLike[str], cfg: DictConfig) -> bool:
    """Write ``.hydra/{config,hydra,overrides}.yaml`` as Hydra would, atomically, when running as a Hydra job.

    ``conf/hydra/default.yaml`` sets ``output_subdir: null`` so that Hydra does not write them before the run folder
    was checked (a failed or different command would otherwise replace a finished run's config); training writes them
    once the command was accepted. Outside a Hydra job (a config composed in Python) nothing is written.

    Returns:
        Whether the files were written.
    """
    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.instance().cfg
    if not OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None, throw_on_missing=False):
        return False
    folder = Path(run_dir) / ".hydra"
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(_task_config(cfg))))
    atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))
    return True


def resume_mode(cfg: DictConfig) -> bool | str:
    """``resume`` of a train config: ``"auto"`` (also for null), ``True`` or ``False``.

    Raises:
        ConfigError: any other value.
    """
    value = cfg.get("resume", "auto")
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, bool):
        return value
    raise ConfigError(
        f"resume={value!r} must be auto (continue an unfinished run), true (also a finished one) or false."
    )


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_train_config(cfg: DictConfig) -> None:
    """Refuse the values Lightning would only reject with a traceback, before anything is built or written.

    ``medseg train`` checks them before Hydra creates the run folder (:mod:`medseg.launch`), and training checks them
    again for a config composed in Python.

    Raises:
        ConfigError: a step, epoch or validation count that is no count, no limit on training at all, an unknown
            ``resume``, or ``overwrite=true`` together with ``resume=true``/``ckpt_path`` (start over, or continue?).
    """
    trainer = cfg.get("trainer") or {}
    steps, epochs = trainer.get("max_steps", -1), trainer.get("max_epochs", None)
    if not _whole(steps) or not (steps == -1 or steps >= 1):
        raise ConfigError(
            f"trainer.max_steps={steps!r} is not a number of optimisation steps: give a whole number >= 1 (or -1 to "
            f"stop by trainer.max_epochs)."
        )
    if epochs is not None and (not _whole(epochs) or not (epochs == -1 or epochs >= 1)):
        raise ConfigError(f"trainer.max_epochs={epochs!r} must be a whole number >= 1, -1 or null.")
    if steps == -1 and epochs == -1:
        raise ConfigError("trainer.max_steps=-1 and trainer.max_epochs=-1 would train forever: set trainer.max_steps.")
    every = trainer.get("check_val_every_n_epoch", 1)
    if every is not None and (not _whole(every) or every < 1):
        raise ConfigError(f"trainer.check_val_every_n_epoch={every!r} must be a whole number >= 1 (or null).")
    mode, overwrite = resume_mode(cfg), cfg.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite={overwrite!r} must be true or false.")
    if overwrite and (mode is True or cfg.get("ckpt_path")):
        raise ConfigError(
            "overwrite=true starts the run over, resume=true/ckpt_path continue it: give one of them, not both."
        )
    if overwrite and not cfg.get("fit", True):
        raise ConfigError("overwrite=true with fit=false would discard the checkpoints it evaluates: drop one of them.")


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be resumed from (missing, not a torch zip file, truncated, a bad CRC), or ``None``.

    Reads the file once to check every member's CRC, without unpickling or allocating its tensors: Lightning then
    loads it (weights-only) for the resume itself.
    """
    path = Path(path)
    if not path.is_file():
        return "no such file"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
    return f"member {bad} is corrupted" if bad else None


def resolve_resume(run_dir: str | os.PathLike[str], resume: bool, ckpt_path: str | None) -> str | None:
    """The checkpoint ``Trainer.fit`` should continue from: an explicit path, else ``last.ckpt`` when resuming.

    A ``last.ckpt`` that cannot be read (truncated or corrupted, e.g. by a copy or a disk written by an older
    version) is not resumed from: the newest readable ``best_*.ckpt`` is, with a warning naming both; it holds the full
    training state of an earlier epoch. The unreadable file stays until the next epoch replaces it.

    Raises:
        ConfigError: ``ckpt_path`` was given but is not a file.
        WeightsError: ``ckpt_path``, or ``last.ckpt`` with no readable fallback, cannot be read.
    """
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={ckpt_path} is not a file. Give an existing .ckpt or leave ckpt_path=null.")
        problem = checkpoint_problem(ckpt_path)
        if problem:
            raise WeightsError(f"ckpt_path={ckpt_path} cannot be resumed from ({problem}): give an intact .ckpt.")
        return str(ckpt_path)
    last = last_checkpoint(run_dir) if resume else None
    if last is None:
        return None
    problem = checkpoint_problem(last)
    if problem is None:
        return str(last)
    folder = checkpoint_dir(run_dir)
    for candidate in sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_problem(candidate) is None:
            log.warning(
                "%s is unreadable (%s; truncated or corrupted): resuming from %s instead, the newest intact "
                "checkpoint (an earlier epoch).", last, problem, candidate.name,
            )  # fmt: skip
            return str(candidate)
    raise WeightsError(
        f"{last} is unreadable ({problem}; truncated or corrupted) and {folder} holds no other intact checkpoint to "
        f"resume from: rerun with overwrite=true to start the run over, or give ckpt_path=<an intact .ckpt>."
    )


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
