"""What ``medseg train`` runs: build data, model, task and trainer from the Hydra config, train, then evaluate.

Everything is built with :func:`medseg.config.instantiate` from ``conf/train.yaml``; nothing about a particular model
or dataset is written here. :func:`train` returns the run's metrics (``optimized_metric`` among them), which is what
Hydra sweepers (Optuna) optimise and what the benchmark's jobs record. Re-running the same command resumes an
unfinished run from ``checkpoints/last.ckpt``; the run folder is locked while a command works on it and checked before
anything is written (:mod:`medseg.runs`, :mod:`medseg.workflows.run_folder`), and checkpoints are written atomically
as plain data (:mod:`medseg.tasks.checkpointing`). The test cases are then scored on their native grid by
:func:`medseg.workflows.evaluation.evaluate_model`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from medseg.config import instantiate
from medseg.data.datamodule import resolve_median_spacing
from medseg.inference.run_data import write_run_data
from medseg.runs import (
    RunLock,
    check_train_config,
    discard_run,
    resolve_resume,
    resume_mode,
    save_run_config,
    select_checkpoint,
    write_state,
)
from medseg.tasks.checkpointing import SafeCheckpointIO, load_weights
from medseg.workflows.evaluation import evaluate_model
from medseg.workflows.memory import peak_memory_mb
from medseg.workflows.nnunet.workflow import train_nnunet
from medseg.workflows.run_folder import check_run_folder

__all__ = ["build_callbacks", "build_loggers", "resolve_precision", "train"]

log = logging.getLogger("medseg.train")


def resolve_precision(precision: Any) -> Any:
    """``auto``: bf16 autocast on CUDA GPUs that support bf16, full fp32 elsewhere (CPU bf16 autocast helps only
    with native bf16 instructions, AVX512-BF16 or AMX: ask for ``bf16-mixed`` explicitly there)."""
    if str(precision) != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _built(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a callbacks/logger group (entries set to null are skipped)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The ``callbacks`` group's objects."""
    return _built(cfg.get("callbacks"))


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The ``logger`` group's objects (CSV and TensorBoard by default)."""
    return _built(cfg.get("logger"))


def _choice(cfg: DictConfig, key: str, default: str = "?") -> str:
    value = OmegaConf.select(cfg, key, throw_on_missing=False, default=default)
    try:
        return str(value)
    except Exception:  # an interpolation that cannot resolve outside a Hydra run
        return default


def _overview(cfg: DictConfig, datamodule: Any, task: Any) -> dict[str, Any]:
    """What is being trained, logged once at the start and stored in ``summary.json``."""
    report = task.trainable_report()
    trainable = int(report.get("trainable", 0))
    total = int(report.get("total", 0))
    return {
        "dataset": datamodule.info.root.name,
        "fold": int(datamodule.fold),
        "label_fraction": float(datamodule.label_fraction),
        "backbone": _choice(cfg, "model.backbone", default="none"),  # baselines have none
        "init": _choice(cfg, "init"),
        "adapter": _choice(cfg, "adapter_name"),
        "model": _choice(cfg, "model_name"),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
        "num_train_cases": len(datamodule.train_ids),
        "num_val_cases": len(datamodule.val_ids),
        "num_test_cases": len(datamodule.test_ids),
        "max_steps": int(cfg.trainer.get("max_steps", -1)),
        "seed": int(cfg.seed),
    }


def _log_overview(facts: dict[str, Any]) -> None:
    log.info(
        "Training %s (init=%s, adapter=%s): %s of %s parameters trainable (%.3f %%)",
        facts["model"], facts["init"], facts["adapter"], f"{facts['trainable_params']:,}",
        f"{facts['total_params']:,}", facts["trainable_percent"],
    )  # fmt: skip
    log.info(
        "Data %s, fold %d: %d training cases (label fraction %.2f), %d validation, %d test; %d steps",
        facts["dataset"], facts["fold"], facts["num_train_cases"], facts["label_fraction"], facts["num_val_cases"],
        facts["num_test_cases"], facts["max_steps"],
    )  # fmt: skip


def _interactive_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``test/dice_click{k}`` (k = 1 and the last), ``test/noc85``, ``test/noc90``, ``test/box_dice`` and
    ``test/propagation_dice`` of a promptable run's ``interactive`` foreground mean, or ``test/dsc_auc``,
    ``test/nsd_auc``, ``test/final_dsc`` and ``test/final_nsd`` of its SegFM3D ``protocol`` (nothing for dense runs)."""
    means = (summary.get("interactive") or {}).get("foreground_mean") or {}
    out: dict[str, float] = {}
    dices = means.get("dice_at_k") or []
    for k in sorted({1, len(dices)}) if dices else ():
        out[f"test/dice_click{k}"] = float(dices[k - 1])
    for key in ("noc85", "noc90", "box_dice", "propagation_dice"):
        if means.get(key) is not None:
            out[f"test/{key}"] = float(means[key])
    protocol = (summary.get("protocol") or {}).get("mean") or {}  # task.evaluation.protocol=segfm3d
    for key in ("dsc_auc", "nsd_auc", "final_dsc", "final_nsd"):
        if protocol.get(key) is not None:
            out[f"test/{key}"] = float(protocol[key])
    return out


def train(cfg: DictConfig) -> dict[str, float]:
    """Train one run and evaluate it on the test cases; return the metrics (``optimized_metric`` for sweeps).

    The first process (rank 0) holds the run folder's lock throughout and checks the folder before building
    anything (:func:`~medseg.workflows.run_folder.check_run_folder`); the other DDP ranks only train.

    Raises:
        ConfigError: an invalid value (:func:`medseg.runs.check_train_config`), or a run folder that is locked by
            another process, holds a finished run or a run of another config.
    """
    if cfg.get("nnunet"):  # +nnunet=2d: nnU-Net v2's own pipeline on this run's split, scored like every run
        return train_nnunet(cfg)
    check_train_config(cfg)
    run_dir = Path(cfg.run_dir)
    leader = L.pytorch.utilities.rank_zero_only.rank == 0
    with RunLock(run_dir) if leader else contextlib.nullcontext():
        if leader:
            check_run_folder(run_dir, cfg)
        return _train(cfg, run_dir, leader)


def _train(cfg: DictConfig, run_dir: Path, leader: bool) -> dict[str, float]:
    started = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True)
    overwrite = bool(cfg.get("overwrite", False))
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels)
    task = instantiate(cfg.task, model=model, label_names=datamodule.label_names)
    loggers = build_loggers(cfg)
    callbacks = [
        c for c in build_callbacks(cfg) if loggers or not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)
    ]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[SafeCheckpointIO()],
        precision=resolve_precision(cfg.trainer.get("precision", "auto")),
    )  # fmt: skip
    # Everything is built: only now does the command change the run folder.
    ckpt_path = None
    if cfg.get("fit", True):
        resume = resume_mode(cfg) is not False and not overwrite
        ckpt_path = resolve_resume(run_dir, resume, cfg.get("ckpt_path"))
    if leader:
        if overwrite and (removed := discard_run(run_dir)):
            log.info("overwrite=true: removed %s", ", ".join(p.name for p in removed))
        save_run_config(run_dir, cfg)
        preprocess, _ = resolve_median_spacing(datamodule.deterministic_config, datamodule.info)
        write_run_data(
            run_dir, datamodule.info.root.name, datamodule.label_names, datamodule.num_channels, preprocess,
            label_codes=datamodule.info.raw.get("label_codes"),
        )  # fmt: skip
        if cfg.get("fit", True) and not trainer.fast_dev_run:
            write_state(run_dir, "training")
    facts = _overview(cfg, datamodule, task)
    if trainer.is_global_zero:
        _log_overview(facts)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    metrics: dict[str, float] = {}
    if cfg.get("fit", True):
        if ckpt_path and trainer.is_global_zero:
            log.info("Resuming from %s", ckpt_path)
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    train_seconds = time.perf_counter() - started
    memory = peak_memory_mb()

    if cfg.get("evaluate", True) and trainer.is_global_zero and not trainer.interrupted:
        which = str(cfg.get("eval_ckpt", "best"))
        checkpoint = None if trainer.fast_dev_run else select_checkpoint(run_dir, which)
        if checkpoint is not None:
            load_weights(task, checkpoint)
        extras = {
            **facts,
            **memory,
            "checkpoint": checkpoint.name if checkpoint is not None else "final weights",
            "steps_trained": int(trainer.global_step),
            "train_wall_time_s": round(train_seconds, 1),
        }
        summary = evaluate_model(task, datamodule, run_dir, extras=extras, started=started)
        metrics["test/dice_fg"] = summary["foreground_mean"]["dice"]
        for metric in ("hd95", "nsd"):
            if summary["foreground_mean"].get(metric) is not None:
                metrics[f"test/{metric}_fg"] = summary["foreground_mean"][metric]
        metrics.update(_interactive_metrics(summary))

    if leader and cfg.get("fit", True) and not trainer.fast_dev_run and not trainer.interrupted:
        evaluated = bool(cfg.get("evaluate", True))
        write_state(run_dir, "finished", steps_trained=int(trainer.global_step), evaluated=evaluated)
    wanted = cfg.get("optimized_metric")
    if wanted and trainer.is_global_zero and wanted not in metrics:
        log.warning(
            "optimized_metric=%s was not produced by this run (available: %s); val/* needs validation to run "
            "(trainer.check_val_every_n_epoch), test/* needs evaluate=true.", wanted, sorted(metrics),
        )  # fmt: skip
    return metrics
