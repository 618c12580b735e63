"""Callbacks for long, resumable runs: a step-based progress bar, random states in checkpoints, weight digests.

Lightning's checkpoints restore the weights, the optimiser, the scheduler and the loop counters, but not the random
number generators: a resumed run would draw other slices, other augmentations and another shuffling than the
uninterrupted run. :class:`RandomStateCheckpoint` stores them with the checkpoint so that, with the same seed, a run
interrupted at an epoch boundary and resumed ends with exactly the same weights.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar

from medseg.data.sampling import EpochSeededSampler

__all__ = ["RandomStateCheckpoint", "StepProgressBar", "WeightsDigest", "state_digest"]


class StepProgressBar(RichProgressBar):
    """Rich progress bar over the run's optimisation steps (``trainer.max_steps``), with elapsed time and ETA.

    Lightning's bar restarts every epoch; medseg counts training in steps and its epochs are short passes over the
    training cases, so a per-epoch ETA says nothing. With ``max_steps = -1`` it behaves like ``RichProgressBar``.
    """

    def _step_total(self, trainer: L.Trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def _get_train_description(self, current_epoch: int) -> str:
        if self._step_total(self.trainer) is None:
            return super()._get_train_description(current_epoch)
        return f"Training (epoch {current_epoch})"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = self._step_total(trainer)
        if total is None or self.is_disabled:
            return super().on_train_epoch_start(trainer, pl_module)
        description = self._get_train_description(trainer.current_epoch)
        if self.progress is not None:
            if self.train_progress_bar_id is None:
                self.train_progress_bar_id = self._add_task(total, description)
                self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
            else:
                self.progress.update(self.train_progress_bar_id, description=description)
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._step_total(trainer) is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def _np_state_to_plain(state: tuple) -> tuple:
    """NumPy's RNG state with plain types, so it loads under ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = state
    return name, torch.as_tensor(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _np_state_from_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


def _epoch_seeded_samplers(trainer: L.Trainer) -> list[EpochSeededSampler]:
    """The training loaders' :class:`EpochSeededSampler` s, also when Lightning wrapped them for DDP."""
    found = []
    for loader in trainer.fit_loop._combined_loader.flattened if trainer.fit_loop._combined_loader else []:
        for sampler in (
            getattr(loader, "sampler", None),
            getattr(getattr(loader, "batch_sampler", None), "sampler", None),
        ):
            inner = getattr(
                getattr(sampler, "dataset", None), "_sampler", None
            )  # Lightning's DistributedSamplerWrapper
            for candidate in (sampler, inner):
                if isinstance(candidate, EpochSeededSampler) and candidate not in found:
                    found.append(candidate)
    return found


class RandomStateCheckpoint(Callback):
    """Makes a resumed run continue exactly as the uninterrupted run would have.

    Data randomness (order, sampled slices or patches, augmentation) is a function of ``(seed, epoch)`` through
    :class:`~medseg.data.sampling.EpochSeededSampler`. This callback tells the sampler the epoch computed from the
    optimisation step count, which a checkpoint restores exactly; Lightning's own epoch counter can run one ahead after
    a restore. The global Python, NumPy and torch states (dropout and other model randomness) are saved with each
    checkpoint (written at epoch ends) and put back at the start of the first epoch after a restore.
    """

    def __init__(self) -> None:
        self._snapshot: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._snapshot = {
            "python": random.getstate(),
            "numpy": _np_state_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            self._snapshot["cuda"] = torch.cuda.get_rng_state_all()

    def state_dict(self) -> dict[str, Any]:
        return dict(self._snapshot) if self._snapshot is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict) or None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written as an epoch ended records that epoch's last batch as the current one; Lightning 2.x
        # then resumes "inside" the next epoch and runs a stray batch before it. Marking the epoch's batch progress as
        # reset (it is: the epoch is over) makes the resumed run start the next epoch cleanly.
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        batches = loop.get("epoch_loop.batch_progress")
        if batches and batches.get("is_last_batch"):
            batches["current"] = dict.fromkeys(batches["current"], 0)
            batches["is_last_batch"] = False
            schedulers = loop.get("epoch_loop.scheduler_progress")
            if schedulers:
                schedulers["current"] = dict.fromkeys(schedulers["current"], 0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            state, self._pending = self._pending, None
            random.setstate(state["python"])
            np.random.set_state(_np_state_from_plain(state["numpy"]))
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
        batches = trainer.num_training_batches
        if isinstance(batches, int | float) and 0 < batches < float("inf"):
            epoch = int(trainer.global_step * trainer.accumulate_grad_batches // int(batches))
            for sampler in _epoch_seeded_samplers(trainer):
                sampler.set_epoch(epoch)


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and exact values), to compare weights bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class WeightsDigest(Callback):
    """Writes ``rank<r>.txt`` with :func:`state_digest` of the model at the end of training, on every rank.

    Under DDP all ranks must end with identical weights; comparing these files checks it without loading anything.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"rank{trainer.global_rank}.txt"
        path.write_text(f"{state_digest(pl_module)} {trainer.global_step}\n")
