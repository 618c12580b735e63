"""Checkpoints a resumed run can always read: plain data only, written atomically, ``last.ckpt`` every epoch.

Lightning's own path has three gaps that a kill or a full disk turns into a run that cannot continue:

- ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only when it also wrote a top-k checkpoint, i.e. on
  validation epochs that improved the monitored score; a run killed later resumes from an old epoch, if at all.
  :class:`LastCheckpoint` writes it at the end of every epoch (or every N optimisation steps) whatever validation does.
- ``TorchCheckpointIO`` stages the file in the system's temporary folder and then *copies* it into the run folder
  (``fsspec`` moves across file systems by copying), so a disk that fills during the copy leaves a truncated
  ``last.ckpt`` in place of the good one. :class:`SafeCheckpointIO` writes a hidden temporary file next to the
  target, syncs it and renames it (:func:`medseg.atomic.atomic_path`): the previous checkpoint stays intact until the
  new one is complete.
- Anything in the saved state that is not a plain tensor or container (a MONAI ``MetaTensor`` reaching
  ``ModelCheckpoint``'s best score through a logged metric, say) is refused by ``torch.load(weights_only=True)``,
  which is how checkpoints are read back (:func:`medseg.backbones.weights.load_checkpoint`: no pickle ever runs code).
  :func:`plain_state` turns tensor subclasses into tensors before saving and names any other object it finds.

:func:`load_weights` puts a checkpoint's weights into a task the same weights-only way, strictly (``medseg evaluate``,
``medseg export``). Whether a checkpoint can be resumed from at all is :func:`medseg.runs.checkpoint_problem`.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from medseg.atomic import atomic_path, remove_orphans
from medseg.backbones.weights import load_checkpoint, read_lightning_state
from medseg.errors import ConfigError, WeightsError
from medseg.runs import LAST

__all__ = ["LastCheckpoint", "SafeCheckpointIO", "load_weights", "plain_state"]

# Leaves torch.load(weights_only=True) rebuilds without an allow-list (besides tensors and the containers below);
# subclasses of the builtins (a MONAI string enum, an IntEnum) are saved as their builtin value.
_BUILTIN_LEAVES = (bool, int, float, complex, str, bytes)
_TORCH_LEAVES = (type(None), torch.dtype, torch.device, torch.Size)


def plain_state(value: Any, where: str = "checkpoint", strict: bool = True) -> Any:
    """``value`` with tensor subclasses made plain tensors, NumPy scalars made Python numbers, dict subclasses dicts.

    Args:
        value: a checkpoint or a part of it.
        where: its key path, for the message.
        strict: raise on any other object (saving); ``False`` leaves such objects as they are (loading).

    Raises:
        WeightsError: with ``strict``, some other object is in the state (``where`` names its key path), which
            ``torch.load(weights_only=True)`` would refuse on resume; found while saving instead of when resuming.
    """
    if isinstance(value, torch.Tensor):
        return value if type(value) is torch.Tensor else value.as_subclass(torch.Tensor)
    if isinstance(value, _TORCH_LEAVES):
        return value
    for kind in _BUILTIN_LEAVES:
        if isinstance(value, kind):
            return value if type(value) is kind else kind.__new__(kind, value)
    if isinstance(value, np.generic) and isinstance(value.item(), _BUILTIN_LEAVES):
        return value.item()
    if isinstance(value, Mapping):
        items = ((key, plain_state(item, f"{where}/{key}", strict)) for key, item in value.items())
        return collections.OrderedDict(items) if isinstance(value, collections.OrderedDict) else dict(items)
    if isinstance(value, list | tuple | set):
        items = [plain_state(item, f"{where}[{i}]", strict) for i, item in enumerate(value)]
        return items if isinstance(value, list) else (set(items) if isinstance(value, set) else tuple(items))
    if not strict:
        return value
    raise WeightsError(
        f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which a weights-only load refuses: "
        f"save plain values (tensors, numbers, strings, lists, dicts) in callback and module state."
    )


def load_weights(task: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load a Lightning checkpoint's weights into ``task`` (strictly: a mismatch is a wrong checkpoint).

    The file is read weights-only (:func:`medseg.backbones.weights.read_lightning_state`): a checkpoint is a pickle,
    and one holding anything but tensors is refused with a ``WeightsError`` before any of it runs.
    """
    task.load_state_dict(read_lightning_state(checkpoint), strict=True)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that saves plain data atomically and loads weights-only with one-line errors."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to a synced temporary sibling of ``path``, then rename it onto ``path``.

        Raises:
            WeightsError: the state holds a non-plain object, or the file could not be written (full disk,
                permissions); the previous file at ``path``, if any, is left as it was.
        """
        state = plain_state(checkpoint)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as temporary:
                torch.save(state, temporary)
        except (OSError, RuntimeError) as err:  # torch's zip writer reports a short write as a RuntimeError
            reason = err.strerror if isinstance(err, OSError) and err.strerror else "the write failed"
            with contextlib.suppress(OSError):
                reason += f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MB free on its disk)"
            kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
            raise WeightsError(
                f"cannot write checkpoint {path}: {reason}; {kept}. Free disk space (or make {path.parent} "
                f"writable) and rerun the same command: the run resumes from its last complete checkpoint."
            ) from None

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """The checkpoint at ``path``, always read weights-only (``weights_only`` is ignored: never a full pickle).

        Raises:
            WeightsError: the file is missing, truncated, corrupted, or holds objects that would run code.
        """
        fix = "a full disk or a copy cut short; give ckpt_path=<an intact .ckpt>, or overwrite=true to start over"
        state = load_checkpoint(path, what="checkpoint", fix=fix)
        if not isinstance(state, dict):
            raise WeightsError(f"checkpoint {path} holds no Lightning checkpoint (a {type(state).__name__}).")
        # Checkpoints of older versions hold a MetaTensor (read as an inert tensor subclass, which Lightning cannot
        # deep-copy into the callbacks): plain tensors from here on.
        return plain_state(state, strict=False)


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` (the full training state) every ``every_n_epochs`` epochs and/or every
    ``every_n_train_steps`` optimisation steps, and when training ends, independently of validation.

    It is a :class:`~lightning.pytorch.callbacks.Checkpoint`, so Lightning runs it after the other callbacks and the
    random states of :class:`~medseg.tasks.callbacks.RandomStateCheckpoint` are those of the epoch just ended.
    """

    def __init__(self, dirpath: str, every_n_epochs: int = 1, every_n_train_steps: int = 0) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"callbacks.last_checkpoint.{name}={value!r} must be a whole number >= 0 (0: not on this trigger)."
                )
        if every_n_epochs == 0 and every_n_train_steps == 0:
            raise ConfigError(
                "callbacks.last_checkpoint writes last.ckpt neither per epoch nor per step, so the run could not be "
                "resumed: set every_n_epochs=1 (or every_n_train_steps=N), or callbacks.last_checkpoint=null."
            )
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self._saved_step: int | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def _skip(self, trainer: L.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking or self._saved_step == trainer.global_step

    def _save(self, trainer: L.Trainer) -> None:
        if not self._skip(trainer):
            trainer.save_checkpoint(self.path)
            self._saved_step = trainer.global_step

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.fast_dev_run:
            remove_orphans(self.dirpath)  # a process killed mid-write left its temporary file behind
        self._saved_step = trainer.global_step  # what was just restored is on disk already

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)  # the final state, also when max_steps ends training inside an epoch
