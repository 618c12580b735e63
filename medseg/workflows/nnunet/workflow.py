"""``medseg train ... +nnunet=2d``: nnU-Net v2 as one more arm, on the run's split and step budget, scored by medseg.

What makes it the same experiment as every other arm: the cases come from the run's datamodule (fold, label-fraction
subset, validation cases; :mod:`medseg.workflows.nnunet.raw_dataset`), training runs ``trainer.max_steps`` of
nnU-Net's iterations (:mod:`medseg.workflows.nnunet.trainer`), and its test predictions, which nnU-Net's predictor
writes on each test image's own grid, are scored by :func:`medseg.evaluation.evaluate_folder` into the run's
``summary.json`` with the metric keys ``medseg train`` returns (``test/dice_fg``, ``test/hd95_fg``, ``test/nsd_fg``).
What stays nnU-Net's own: its fingerprint, plans, preprocessing, network, augmentation, loss, optimiser (SGD at its
1e-2 unless ``nnunet.lr`` is set), mixed precision on CUDA and test-time mirroring. ``data.preprocess``,
``data.sampling``, ``task`` and ``trainer.precision`` are medseg's and do not apply.

nnU-Net runs in a child process (:mod:`medseg.workflows.nnunet.worker`) whose ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` point into ``<run_dir>/nnunet/``, its output going to
``<run_dir>/nnunet/nnunet.log``. The run folder is locked and checked like any run's; an unfinished nnU-Net run is
started over when re-run (nnU-Net keeps no checkpoint to resume from within a short budget).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from medseg.atomic import atomic_write_json
from medseg.config import instantiate
from medseg.errors import ConfigError, MedsegError
from medseg.evaluation import evaluate_folder
from medseg.runs import SUMMARY, RunLock, check_train_config, discard_run, save_run_config, write_state
from medseg.workflows.memory import peak_memory_mb
from medseg.workflows.nnunet.raw_dataset import nnunet_environment, write_raw_dataset, write_splits
from medseg.workflows.nnunet.settings import NnunetSettings, require_nnunet
from medseg.workflows.run_folder import check_run_folder, is_finished

__all__ = ["NnunetError", "run_nnunet", "train_nnunet"]

log = logging.getLogger("medseg.train")

NNUNET_DIR = "nnunet"
LOG_FILE = "nnunet.log"
RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"
NSD_TOLERANCE_MM = 2.0  # as medseg.workflows.evaluation.evaluate_model


class NnunetError(MedsegError):
    """nnU-Net's process stopped before it finished; the message names its log."""


def _environment(nnunet_dir: Path, settings: NnunetSettings) -> dict[str, str]:
    env = {**os.environ, **nnunet_environment(nnunet_dir)}
    if settings.compile is not None:
        env["nnUNet_compile"] = "true" if settings.compile else "false"
    return env


def run_nnunet(spec: dict[str, Any], nnunet_dir: Path, settings: NnunetSettings) -> dict[str, Any]:
    """Run :mod:`~medseg.workflows.nnunet.worker` on ``spec`` in a child process with the run's nnU-Net folders.

    Raises:
        NnunetError: the process failed; the message holds its last line and the log's path.
    """
    spec_path, log_path = nnunet_dir / SPEC_FILE, nnunet_dir / LOG_FILE
    atomic_write_json(spec_path, spec)
    command = [sys.executable, "-m", "medseg.workflows.nnunet.worker", str(spec_path)]
    with open(log_path, "w", encoding="utf-8") as output:
        code = subprocess.run(command, env=_environment(nnunet_dir, settings), stdout=output, stderr=subprocess.STDOUT)
    result = Path(spec["result"])
    if code.returncode != 0 or not result.is_file():
        lines = [line for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        raise NnunetError(
            f"nnU-Net stopped (exit code {code.returncode}): {lines[-1].strip() if lines else 'no output'}; the whole "
            f"output is in {log_path}."
        )
    return json.loads(result.read_text(encoding="utf-8"))


def train_nnunet(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate one nnU-Net arm; return the metrics ``medseg train`` returns (``test/dice_fg``, ...).

    Raises:
        ConfigError: nnunetv2 is not installed, a setting is invalid, or the run folder refuses the command.
        NnunetError: nnU-Net failed (its log is named).
    """
    require_nnunet()
    check_train_config(cfg)
    settings = NnunetSettings.from_config(cfg)
    if not cfg.get("fit", True):
        raise ConfigError("fit=false: an nnU-Net arm predicts its test cases right after training; drop fit=false.")
    run_dir = Path(cfg.run_dir)
    with RunLock(run_dir):
        if is_finished(run_dir) and not cfg.get("overwrite", False):
            raise ConfigError(
                f"{run_dir} holds a finished run (nnU-Net arms are neither continued nor re-evaluated): train into "
                f"another folder, or add overwrite=true to start it over."
            )
        check_run_folder(run_dir, cfg)
        return _train(cfg, settings, run_dir)


def _test_cases(datamodule: Any) -> tuple[list[Any], Path]:
    cases = [c for c in datamodule.info.test if c.case_id in set(datamodule.test_ids)]
    if not cases or any(c.label is None for c in cases):
        raise ConfigError(
            f"{datamodule.info.root} has no labelled test cases (imagesTs/ with labelsTs/); an nnU-Net arm is "
            f"evaluated on them like every run: add them, or set evaluate=false."
        )
    return cases, Path(cases[0].label).parent


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _train(cfg: DictConfig, settings: NnunetSettings, run_dir: Path) -> dict[str, float]:
    started = time.perf_counter()
    evaluate = bool(cfg.get("evaluate", True))
    datamodule = instantiate(cfg.data)
    datamodule.split()  # the datamodule's own split (fold, label-fraction subset, validation, test), no data loaded
    info, train_ids, val_ids = datamodule.info, list(datamodule.train_ids), list(datamodule.val_ids)
    test_cases, reference_dir = _test_cases(datamodule) if evaluate else ([], None)
    if cfg.get("overwrite", False) and (removed := discard_run(run_dir)):
        log.info("overwrite=true: removed %s", ", ".join(p.name for p in removed))
    save_run_config(run_dir, cfg)
    write_state(run_dir, "training")
    nnunet_dir = _fresh(run_dir / NNUNET_DIR)
    raw = write_raw_dataset(info, train_ids, val_ids, nnunet_dir / "raw")
    write_splits(nnunet_dir / "preprocessed", raw.name, train_ids, val_ids)
    predictions = _fresh(run_dir / "predictions")
    log.info(
        "nnU-Net %s on %s, fold %d: %d training cases (label fraction %.2f), %d validation, %d test; %d iterations "
        "on %s (output: %s)", settings.configuration, info.name, datamodule.fold, len(train_ids),
        datamodule.label_fraction, len(val_ids), len(test_cases), settings.max_steps, settings.device,
        nnunet_dir / LOG_FILE,
    )  # fmt: skip
    spec = {
        "settings": settings.to_json(),
        "dataset_name": raw.name,
        "threads": torch.get_num_threads(),
        "test_cases": [{"case_id": c.case_id, "images": [str(p) for p in c.images]} for c in test_cases],
        "predictions": str(predictions),
        "result": str(nnunet_dir / RESULT_FILE),
    }
    result = run_nnunet(spec, nnunet_dir, settings)
    metrics: dict[str, float] = {}
    if result.get("val_pseudo_dice") is not None:
        metrics["val/nnunet_pseudo_dice"] = float(result["val_pseudo_dice"])
    if evaluate:
        eval_started = time.perf_counter()
        extras = _extras(cfg, datamodule, settings, result, started, eval_started)
        summary = evaluate_folder(
            predictions, reference_dir, datamodule.label_names, nsd_tolerance_mm=NSD_TOLERANCE_MM,
            suffix=info.file_ending, output=run_dir / SUMMARY, extras=extras,
        )  # fmt: skip
        metrics["test/dice_fg"] = summary["foreground_mean"]["dice"]
        for metric in ("hd95", "nsd"):
            if summary["foreground_mean"].get(metric) is not None:
                metrics[f"test/{metric}_fg"] = summary["foreground_mean"][metric]
        log.info("Test foreground mean Dice %.4f -> %s", summary["foreground_mean"]["dice"] or 0.0, run_dir / SUMMARY)
    write_state(run_dir, "finished", steps_trained=int(result["steps_trained"]), evaluated=evaluate)
    return metrics


def _model_name(cfg: DictConfig, settings: NnunetSettings) -> str:
    try:
        return str(OmegaConf.select(cfg, "model_name", default=None) or f"nnunet-{settings.configuration}")
    except Exception:  # an interpolation that cannot resolve outside a Hydra run
        return f"nnunet-{settings.configuration}"


def _extras(
    cfg: DictConfig,
    datamodule: Any,
    settings: NnunetSettings,
    result: dict[str, Any],
    started: float,
    eval_started: float,
) -> dict[str, Any]:
    """The run facts of ``summary.json``, with the keys of a medseg run's (``medseg.workflows.training``)."""
    trainable, total = int(result["trainable_params"]), int(result["total_params"])
    parent = peak_memory_mb()
    memory = {"peak_rss_mb": max(v for v in (parent.get("peak_rss_mb"), result.get("peak_rss_mb"), 0.0) if v)}
    if result.get("peak_gpu_memory_mb") is not None:
        memory["peak_gpu_memory_mb"] = result["peak_gpu_memory_mb"]
    nnunet_keys = (
        "plans", "configuration", "trainer", "batch_size", "patch_size", "spacing", "epochs", "initial_lr",
        "val_pseudo_dice", "preprocess_wall_time_s", "predict_wall_time_s", "train_flops_per_step", "train_flops_note",
    )  # fmt: skip
    return {
        "dataset": datamodule.info.root.name,
        "fold": int(datamodule.fold),
        "label_fraction": float(datamodule.label_fraction),
        "backbone": "none",
        "init": "scratch",
        "adapter": "none",
        "model": _model_name(cfg, settings),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
        "num_train_cases": len(datamodule.train_ids),
        "num_val_cases": len(datamodule.val_ids),
        "num_test_cases": len(datamodule.test_ids),
        "max_steps": settings.max_steps,
        "seed": settings.seed,
        **memory,
        "checkpoint": "checkpoint_final.pth",
        "steps_trained": int(result["steps_trained"]),
        "train_wall_time_s": round(float(result["preprocess_wall_time_s"]) + float(result["train_wall_time_s"]), 1),
        "eval_wall_time_s": round(float(result["predict_wall_time_s"]) + time.perf_counter() - eval_started, 1),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "nnunet": {key: result.get(key) for key in nnunet_keys},
    }
