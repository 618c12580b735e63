"""One benchmark job as a Hydra task function, and the record (``job.json``) it leaves in its run folder.

:func:`train_job` is what the Hydra launcher runs for each job (in this process, in joblib workers, or in a SLURM
job): :func:`medseg.workflows.training.train` with its outcome written to ``<run_dir>/job.json`` -- ``ok`` with the
run's metrics, or ``failed`` with the error and its traceback -- so that the runner learns what happened from the run
folder alone, whichever launcher ran it. An exception still propagates to Hydra, which marks the job failed and goes
on with the next one.

Peak memory: in-process launchers run many jobs in one process, whose peak resident memory would carry over from one
job to the next; the job resets the kernel's high-water mark before training (:func:`medseg.workflows.memory.
reset_peak_rss`, Linux) and records its own peak, ``null`` where it cannot be reset. An nnU-Net arm trains in a child
process (:mod:`medseg.workflows.nnunet`), whose peak is not the job's: the record takes the larger of the two, and
keeps the child's own (``nnunet_peak_rss_mb``) and its GPU peak (``peak_gpu_memory_mb``) from nnU-Net's
``result.json``.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from medseg.atomic import atomic_write_json
from medseg.workflows.memory import peak_rss_mb, reset_peak_rss
from medseg.workflows.nnunet.workflow import NNUNET_DIR, RESULT_FILE
from medseg.workflows.training import train

__all__ = ["JOB_FILE", "nnunet_memory", "read_job", "search_done", "train_job"]

JOB_FILE = "job.json"


def read_job(run_dir: str | Path) -> dict[str, Any] | None:
    """The run folder's ``job.json``, or ``None`` when the job never started or the file is unreadable."""
    path = Path(run_dir) / JOB_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def search_done(run_dir: str | Path, metric: str) -> bool:
    """Whether a search run finished and recorded its validation ``metric``."""
    record = read_job(run_dir)
    return bool(record and record.get("status") == "ok" and (record.get("metrics") or {}).get(metric) is not None)


def nnunet_memory(run_dir: str | Path) -> dict[str, float]:
    """Peak memory (MB) of an nnU-Net run's child process, from its ``nnunet/result.json``; ``{}`` for other runs."""
    try:
        result = json.loads((Path(run_dir) / NNUNET_DIR / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    memory = {}
    for key, name in (("peak_rss_mb", "nnunet_peak_rss_mb"), ("peak_gpu_memory_mb", "peak_gpu_memory_mb")):
        if isinstance(result.get(key), (int, float)):
            memory[name] = float(result[key])
    return memory


def train_job(cfg: DictConfig) -> dict[str, Any]:
    """Hydra task function: train (and evaluate) one run and record the outcome in ``<run_dir>/job.json``.

    Returns:
        The record: ``status``, ``metrics`` (validation and test metrics of the run), ``wall_time_s`` (s),
        ``peak_rss_mb`` (MB, this job only; with an nnU-Net child process, the larger of the two), ``overrides``, and
        for an nnU-Net run ``nnunet_peak_rss_mb`` and ``peak_gpu_memory_mb`` (see :func:`nnunet_memory`).
    """
    run_dir = Path(str(cfg.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        overrides = list(OmegaConf.to_container(HydraConfig.get().overrides.task))
    except ValueError:  # called outside a Hydra job (tests)
        overrides = []
    record: dict[str, Any] = {
        "status": "running",
        "overrides": overrides,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(run_dir / JOB_FILE, record)
    measured = reset_peak_rss()
    started = time.perf_counter()
    try:
        metrics = train(cfg)
    except Exception as err:
        record.update(
            status="failed",
            error=f"{type(err).__name__}: {' '.join(str(err).split())}",
            traceback=traceback.format_exc(),
            wall_time_s=round(time.perf_counter() - started, 1),
        )
        atomic_write_json(run_dir / JOB_FILE, record)
        raise
    peak = peak_rss_mb() if measured else None
    child = nnunet_memory(run_dir)
    if "nnunet_peak_rss_mb" in child:
        peak = max(peak or 0.0, child["nnunet_peak_rss_mb"])
    record.update(
        status="ok",
        metrics={k: float(v) for k, v in metrics.items()},
        wall_time_s=round(time.perf_counter() - started, 1),
        peak_rss_mb=peak,
        **child,
    )
    atomic_write_json(run_dir / JOB_FILE, record)
    return record
