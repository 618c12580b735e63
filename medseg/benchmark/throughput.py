"""Training throughput: is a run limited by its model, or by the data and prompt path that feeds it? (issue 17)

One configuration of ``medseg train`` (its Hydra overrides) is measured three ways, in optimisation steps per second
after ``warmup`` untimed steps, so that the numbers can be set side by side:

* ``loop`` (a): the real training loop, a Lightning ``Trainer`` built from ``cfg.trainer`` as ``medseg train`` builds
  it, minus what is not training (no logger, no checkpoints, no validation, no progress bar): data loading, host to
  device copies, the task's ``training_step``, backward, gradient clipping, optimiser and scheduler steps.
* ``model`` (b): the model alone: one real training batch, moved to the device once, then the task's
  ``training_step``, backward, clipping, optimiser and scheduler steps in a plain loop, under the same precision. For
  the promptable task the step includes its click-simulation rounds (they are part of its ``training_step``).
* ``data`` (c): the data and prompt path alone: the train dataloader with the configured workers, the copy to the
  device, and for the promptable task its ``training_step`` with a null model (:class:`NullPromptable`: its mask is
  the previous round's, no network) and a null loss, so that prompt sampling and click simulation run exactly as in
  training; its wall time is split into the data and the prompt parts.

``loop / model`` is the headline: near 1 the model is the bottleneck, far below 1 the GPU waits for the CPU. Models
and tasks are built with :func:`medseg.config.instantiate` from the composed config, the way training wires them.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.utils import get_class
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from medseg.config import CONFIG_DIR, instantiate
from medseg.errors import ConfigError
from medseg.tasks.promptable import PromptableTask

__all__ = [
    "PRECISIONS",
    "NullLoss",
    "NullPromptable",
    "check_configuration",
    "compose_configuration",
    "measure_configuration",
    "measure_data",
    "measure_loop",
    "measure_model",
    "resolve_precision",
]

#: Lightning precisions the model-only loop can reproduce (autocast for the mixed ones, a grad scaler for fp16).
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def compose_configuration(overrides: Sequence[str], run_dir: Path) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` as ``medseg train`` would, its run folder set to ``run_dir``.

    Raises:
        ConfigError: an override is malformed or names an unknown group option or key.
    """
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    except HydraException as err:
        raise ConfigError(f"overrides {' '.join(overrides)}: {' '.join(str(err).split())}") from None
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.choices...} in model_name etc. resolve as in a run
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def resolve_precision(precision: str | None, cfg: DictConfig, device: torch.device) -> str:
    """The run's Lightning precision: ``precision`` or else the config's; ``auto`` is bf16-mixed on a CUDA device with
    bf16 and 32-true otherwise (for the benchmarked device, not for whatever GPU the machine has).

    Raises:
        ConfigError: a precision the model-only loop cannot reproduce.
    """
    value = str(precision or cfg.trainer.get("precision", "auto"))
    if value == "auto":
        value = "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32-true"
    value = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}.get(value, value)
    if value not in PRECISIONS:
        raise ConfigError(f"precision {value!r} is not benchmarked; use one of {', '.join(PRECISIONS)}.")
    return value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(precision: str, device: torch.device) -> AbstractContextManager:
    dtype = _AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _build_task(cfg: DictConfig, datamodule: Any, **overrides: Any) -> L.LightningModule:
    """Model and task as training builds them (the datamodule gives classes, channels and label names)."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if "model" not in overrides:
        overrides["model"] = instantiate(
            cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels
        )
    return instantiate(cfg.task, label_names=datamodule.label_names, **overrides)


def _batches(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (the epoch-seeded sampler advances its epoch on each pass)."""
    while True:
        yield from loader


def _rate(steps: int, seconds: float, cpu_seconds: float) -> dict[str, float]:
    """Wall rate, and the main process's CPU time per step: on a shared machine the wall rate follows the load, the
    CPU time much less (it leaves out dataloader workers, and counts a CUDA synchronise's spin)."""
    return {
        "steps": steps, "seconds": round(seconds, 4), "steps_per_s": round(steps / max(seconds, 1e-9), 4),
        "cpu_ms_per_step": round(cpu_seconds / steps * 1e3, 3),
    }  # fmt: skip


# --------------------------------------------------------------------------- (a) the real training loop
class _StepClock(L.Callback):
    """Wall time between the end of optimisation step ``warmup`` and the end of step ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.start: tuple[float, float] | None = None  # (wall, CPU) seconds
        self.end: tuple[float, float] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step in (self.warmup, self.warmup + self.steps):
            _sync(self.device)
            now = (time.perf_counter(), time.process_time())
            if trainer.global_step == self.warmup:
                self.start = now
            else:
                self.end = now


def _accelerator(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    return {"accelerator": "cpu", "devices": 1}


def measure_loop(
    cfg: DictConfig, datamodule: Any, device: torch.device, precision: str, steps: int, warmup: int
) -> dict[str, Any]:
    """(a) Steps per second of ``Trainer.fit`` from the config's trainer (single device, nothing but training)."""
    task = _build_task(cfg, datamodule)
    clock = _StepClock(warmup, steps, device)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[clock], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, max_steps=warmup + steps,
        max_epochs=-1, precision=precision, strategy="auto", default_root_dir=cfg.run_dir, **_accelerator(device),
    )  # fmt: skip
    try:
        trainer.fit(task, datamodule=datamodule)
    finally:
        datamodule.trainer = None  # the shared datamodule would keep trainer, task and activations alive
    if clock.start is None or clock.end is None:
        raise RuntimeError(f"the trainer stopped at step {trainer.global_step} of {warmup + steps}")
    return _rate(steps, clock.end[0] - clock.start[0], clock.end[1] - clock.start[1])


# --------------------------------------------------------------------------- (b) the model alone
def _optimizer_and_scheduler(task: L.LightningModule, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The task's own ``configure_optimizers``; a schedule of unset length gets ``total_steps`` (as with a trainer)."""
    task.trainer = L.Trainer(
        max_steps=total_steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    try:
        config = task.configure_optimizers()
    finally:
        task.trainer = None
    if isinstance(config, torch.optim.Optimizer):
        return config, None
    scheduler = config.get("lr_scheduler")
    return config["optimizer"], scheduler.get("scheduler") if isinstance(scheduler, Mapping) else scheduler


def _quiet_log(task: L.LightningModule) -> None:
    """``self.log`` without a trainer only warns; the model-only and data loops have none, so it does nothing."""
    task.log = lambda *args, **kwargs: None  # type: ignore[method-assign]


def measure_model(
    cfg: DictConfig, datamodule: Any, device: torch.device, precision: str, steps: int, warmup: int
) -> dict[str, Any]:
    """(b) Steps per second of the task's training step on one pre-made batch already on the device."""
    task = _build_task(cfg, datamodule)
    batch = move_data_to_device(next(iter(datamodule.train_dataloader())), device)
    task.to(device).train()
    _quiet_log(task)
    optimizer, scheduler = _optimizer_and_scheduler(task, warmup + steps)
    clip = cfg.trainer.get("gradient_clip_val")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    params = [p for p in task.parameters() if p.requires_grad]

    def step(index: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(precision, device):
            loss = task.training_step(batch, index)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, float(clip))
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()

    result = _timed(step, steps, warmup, device)
    result["batch_shapes"] = {k: list(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    report = task.trainable_report()
    result["parameters"] = {"trainable": int(report.get("trainable", 0)), "total": int(report.get("total", 0))}
    return result


def _timed(step: Callable[[int], None], steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    for index in range(warmup):
        step(index)
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for index in range(warmup, warmup + steps):
        step(index)
    _sync(device)
    return _rate(steps, time.perf_counter() - start, time.process_time() - cpu)


# --------------------------------------------------------------------------- (c) data and prompts, no network
class NullPromptable(nn.Module):
    """A promptable model without a network: its mask is the previous round's (zeros in the first round).

    It has the interface :class:`~medseg.tasks.promptable.PromptableTask` trains (``spatial_dims``, ``image_size`` or
    ``roi_size``, ``encode``, ``decode``), sized from the data's samples, so the task's prompt sampling and click
    simulation run unchanged around it.
    """

    def __init__(self, spatial_shape: Sequence[int]) -> None:
        super().__init__()
        shape = tuple(int(s) for s in spatial_shape)
        self.spatial_dims = len(shape)
        self.roi_size = shape
        self.image_size = max(shape)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(
        self, embeddings: torch.Tensor, prompts: Any, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        masks = 3 if multimask else 1
        previous = prompts.prev_mask
        if previous is None:
            previous = embeddings.new_zeros((embeddings.shape[0], 1, *embeddings.shape[2:]))
        logits = previous.float().expand(-1, masks, *previous.shape[2:])
        return logits, logits.new_zeros(logits.shape[:2])


class NullLoss(nn.Module):
    """Zero, whatever the masks: the data loop measures prompts, not losses."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits.new_zeros(())


def measure_data(cfg: DictConfig, datamodule: Any, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """(c) Steps per second of the train dataloader (configured workers), the copy to the device and, for the
    promptable task, its training step around :class:`NullPromptable` (prompt sampling and click simulation).

    ``parts_ms_per_step`` splits each timed step's wall time into ``data`` (the next batch and its copy to the
    device) and ``prompts`` (the promptable training step; 0 for other tasks), with a device synchronise between them,
    so that a slow (c) says which side to work on.
    """
    if warmup < 1:
        raise ConfigError("the data loop needs at least one warm-up step (it sizes the null model from a batch).")
    batches = _batches(datamodule.train_dataloader())
    first = move_data_to_device(next(batches), device)
    task = None
    if issubclass(get_class(cfg.task._target_), PromptableTask):
        task = _build_task(cfg, datamodule, model=NullPromptable(first["image"].shape[2:]), loss=NullLoss())
        task.to(device).train()
        _quiet_log(task)

    parts = {"data": 0.0, "prompts": 0.0}

    def step(index: int) -> None:
        start = time.perf_counter()
        batch = first if index == 0 else move_data_to_device(next(batches), device)
        _sync(device)
        middle = time.perf_counter()
        if index >= warmup:
            parts["data"] += middle - start
        if task is not None:
            with torch.no_grad():
                task.training_step(batch, index)
            _sync(device)
            if index >= warmup:
                parts["prompts"] += time.perf_counter() - middle

    result = _timed(step, steps, warmup, device)
    result["prompt_path"] = task is not None
    result["parts_ms_per_step"] = {name: round(value / steps * 1e3, 3) for name, value in parts.items()}
    return result


# --------------------------------------------------------------------------- one configuration
def check_configuration(overrides: Sequence[str], device: torch.device, precision: str | None = None) -> None:
    """Compose ``overrides`` and find its dataset, without building or measuring anything: a benchmark of several
    configurations fails on a typo or a dataset that is not prepared before it spends minutes on the others.

    Raises:
        ConfigError, DatasetError: as :func:`measure_configuration`.
    """
    with tempfile.TemporaryDirectory(prefix="medseg-bench-train-") as work:
        cfg = compose_configuration(overrides, Path(work))
        resolve_precision(precision, cfg, device)
        instantiate(cfg.data)


def _release(device: torch.device) -> None:
    """Free one mode's model, optimiser state and activations before the next mode builds its own (a promptable
    LiteMedSAM step holds gigabytes; two at once do not fit a small machine)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def measure_configuration(
    name: str,
    overrides: Sequence[str],
    device: torch.device,
    steps: int,
    warmup: int,
    precision: str | None = None,
    modes: Sequence[str] = ("loop", "model", "data"),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every mode of one configuration: ``{"name", "overrides", "precision", ..., "loop", "model", "data",
    "loop_over_model"}`` (rates in optimisation steps per second; the load average before and after).

    ``progress`` is told the name of each mode as it starts (a run on a CPU takes minutes).

    Raises:
        ConfigError, DatasetError: a bad override, or a dataset that is not prepared (``medseg prepare NAME``).
    """
    if steps < 1 or warmup < 1:
        raise ConfigError(f"steps ({steps}) and warmup ({warmup}) must be at least 1.")
    with tempfile.TemporaryDirectory(prefix="medseg-bench-train-") as work:
        cfg = compose_configuration(overrides, Path(work))
        precision = resolve_precision(precision, cfg, device)
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        record: dict[str, Any] = {
            "name": name, "overrides": list(overrides), "task": cfg.task._target_.rsplit(".", 1)[-1],
            "precision": precision, "num_workers": datamodule.loader_settings().num_workers,
            "batch_size": int(cfg.data.batch_size),
            "clicks_on_device": OmegaConf.select(cfg, "task.clicks_on_device", default=None),
            "load_before": _load(),
        }  # fmt: skip
        measures = {
            "loop": lambda: measure_loop(cfg, datamodule, device, precision, steps, warmup),
            "model": lambda: measure_model(cfg, datamodule, device, precision, steps, warmup),
            "data": lambda: measure_data(cfg, datamodule, device, steps, warmup),
        }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
            for mode in (m for m in measures if m in modes):
                if progress is not None:
                    progress(mode)
                record[mode] = measures[mode]()
                _release(device)
        if "model" in record and record["task"] == "PromptableTask":
            record["model"]["note"] = "training_step includes the task's click-simulation rounds"
        record["load_after"] = _load()
    if "loop" in record and "model" in record:
        record["loop_over_model"] = round(record["loop"]["steps_per_s"] / record["model"]["steps_per_s"], 4)
    return record
