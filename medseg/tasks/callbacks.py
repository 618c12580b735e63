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
from monai.data import Dataset
from monai.transforms import Randomizable, Transform
from torch.utils.data import Dataset as TorchDataset

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


def _randomizable(obj: Any, found: list[Randomizable], seen: set[int]) -> None:
    """Every MONAI ``Randomizable`` reachable from a dataset, in a stable order.

    Dictionary transforms hold array transforms with their own generators (``RandAffined.rand_affine`` and its
    ``rand_affine_grid``), so every attribute that is a transform (or a list of them) is followed, not only
    ``Compose.transforms``. Data (cached items, arrays) is not walked.
    """
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Randomizable):
        found.append(obj)
    for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
        children = value if isinstance(value, (list, tuple)) else (value,)
        for child in children:
            if isinstance(child, (Transform, Dataset, TorchDataset)):
                _randomizable(child, found, seen)


def _train_transforms(trainer: L.Trainer) -> list[Randomizable]:
    loader = trainer.train_dataloader
    found: list[Randomizable] = []
    if loader is not None:
        for dataloader in loader if isinstance(loader, (list, tuple)) else [loader]:
            _randomizable(getattr(dataloader, "dataset", None), found, set())
    return found


def _np_state_to_plain(state: tuple) -> tuple:
    """A NumPy ``RandomState`` state with its key as a tensor, so checkpoints load with ``weights_only=True``."""
    name, key, pos, has_gauss, cached = state
    return (name, torch.from_numpy(np.asarray(key, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def _np_state_from_plain(state: tuple) -> tuple:
    name, key, pos, has_gauss, cached = state
    return (name, np.asarray(key.numpy(), dtype=np.uint32), pos, has_gauss, cached)


class RandomStateCheckpoint(Callback):
    """Saves the random states (Python, NumPy, torch, CUDA, the training transforms) with every checkpoint.

    States are captured at the end of each training epoch (checkpoints for resuming are written there) and put back
    at the start of the first epoch after a restore, after the dataloader has been built and before it draws its
    shuffling, so the continuation draws exactly what the uninterrupted run drew. With ``num_workers > 0`` each
    worker's seed derives from torch's restored state, so this holds too.
    """

    def __init__(self) -> None:
        self._snapshot: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None

    def _capture(self, trainer: L.Trainer) -> dict[str, Any]:
        state = {
            "python": random.getstate(),
            "numpy": _np_state_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "transforms": [_np_state_to_plain(t.R.get_state()) for t in _train_transforms(trainer)],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._snapshot = self._capture(trainer)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._snapshot) if self._snapshot is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict) or None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        random.setstate(state["python"])
        np.random.set_state(_np_state_from_plain(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        transforms = _train_transforms(trainer)
        if len(transforms) == len(state["transforms"]):
            for transform, saved in zip(transforms, state["transforms"]):
                transform.R.set_state(_np_state_from_plain(saved))


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
