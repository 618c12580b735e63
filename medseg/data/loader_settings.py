"""Data-loader settings and the cache mode chosen from the machine, so that the data path keeps up with the model.

A training step on a GPU takes milliseconds; fed by one Python process that also drives the GPU, it waits for the
CPU. On a CUDA machine the training samples are therefore drawn by worker processes (one core is left to the training
process, at most 8 workers: past that the cached arrays and cheap random transforms no longer gain), kept alive across
epochs (forking a process that holds a large in-memory cache each epoch costs seconds), with pinned host memory for
asynchronous copies and a few batches prefetched per worker. On a CPU the model competes for the same cores, so a
small machine (2-3 cores, this project's CI) loads in the training process itself. Every value may be given
explicitly; ``auto`` only fills in what the configuration leaves open.

``cache: auto`` keeps the preprocessed cases in memory when they fit comfortably (their estimated size, once per
training process, at most half of the memory available), on disk otherwise.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from medseg.errors import ConfigError

__all__ = [
    "AUTO",
    "LoaderSettings",
    "cached_bytes",
    "choose_cache",
    "machine_cpus",
    "resolve_loader_settings",
]

_log = logging.getLogger(__name__)

AUTO = "auto"
_MAX_CUDA_WORKERS = 8
_CUDA_PREFETCH = 4  # batches per worker: covers a slow sample or two without holding much pinned memory


@dataclass(frozen=True)
class LoaderSettings:
    """Keyword arguments of a ``torch.utils.data.DataLoader`` (see :meth:`loader_kwargs`)."""

    num_workers: int
    persistent_workers: bool
    pin_memory: bool
    prefetch_factor: int | None

    def loader_kwargs(self) -> dict[str, object]:
        """The settings as ``DataLoader`` arguments; torch refuses ``prefetch_factor`` and persistent workers
        without workers, so they are left out then."""
        kwargs: dict[str, object] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs


def machine_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM or container allocation), else all of them."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not Linux
        return max(os.cpu_count() or 1, 1)


def _is_auto(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() == AUTO)


def _flag(name: str, value: object, default: bool) -> bool:
    if _is_auto(value):
        return default
    if isinstance(value, bool):
        return value
    raise ConfigError(f"data.{name} must be true, false or auto, got {value!r}.")


def _count(name: str, value: object, default: int | None, minimum: int) -> int | None:
    if _is_auto(value):
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.{name} must be an integer >= {minimum} or auto, got {value!r}.")
    return value


def resolve_loader_settings(
    num_workers: int | str | None = AUTO,
    persistent_workers: bool | str | None = AUTO,
    pin_memory: bool | str | None = AUTO,
    prefetch_factor: int | str | None = AUTO,
    *,
    cuda: bool,
    cpus: int | None = None,
    processes: int = 1,
) -> LoaderSettings:
    """Fill the ``auto`` values for a training process on this machine; explicit values are kept as given.

    Args:
        num_workers, persistent_workers, pin_memory, prefetch_factor: the configured values (``auto`` or ``None``
            to choose). Workers on CUDA: ``min(cpus / processes - 1, 8)``; on a CPU: ``cpus // 4`` up to 4 (none on
            a machine of fewer than 4 cores, where the model needs every core). Persistent workers whenever there are
            workers; pinned memory on CUDA; prefetch 4 batches per worker on CUDA, torch's 2 otherwise.
        cuda: the model trains on a CUDA device.
        cpus: CPUs available (default :func:`machine_cpus`).
        processes: training processes sharing those CPUs (DDP ranks on this node).

    Raises:
        ConfigError: a value that is neither ``auto`` nor of the right type.
    """
    cpus = machine_cpus() if cpus is None else max(int(cpus), 1)
    share = max(cpus // max(int(processes), 1), 1)
    default_workers = min(share - 1, _MAX_CUDA_WORKERS) if cuda else min(share // 4, 4)
    workers = _count("num_workers", num_workers, default_workers, 0)
    assert workers is not None
    prefetch = _count("prefetch_factor", prefetch_factor, _CUDA_PREFETCH if cuda else 2, 1)
    return LoaderSettings(
        num_workers=workers,
        persistent_workers=_flag("persistent_workers", persistent_workers, workers > 0),
        pin_memory=_flag("pin_memory", pin_memory, cuda),
        prefetch_factor=prefetch if workers > 0 else None,
    )


def cached_bytes(
    shapes: Sequence[Sequence[int]],
    spacings: Sequence[Sequence[float]],
    target_spacing: Sequence[float] | None,
    num_channels: int,
) -> int:
    """Estimated bytes of cases once preprocessed and cached: float32 channels and a uint8 label per voxel, on the
    grid of ``target_spacing`` (mm; ``None``: the native grid). An upper bound: foreground cropping only shrinks it.

    Args:
        shapes, spacings: per case, in RAS order (as :class:`medseg.data.fingerprint.Fingerprint` records them).
    """
    if len(shapes) != len(spacings):
        raise ValueError(f"{len(shapes)} shapes but {len(spacings)} spacings.")
    total = 0
    for shape, spacing in zip(shapes, spacings, strict=True):
        if target_spacing is None:
            voxels = math.prod(int(s) for s in shape)
        else:
            voxels = math.prod(
                max(math.ceil(int(n) * float(s) / float(t)), 1)
                for n, s, t in zip(shape, spacing, target_spacing, strict=True)
            )
        total += voxels * (4 * int(num_channels) + 1)
    return total


def choose_cache(estimated_bytes: int, available_bytes: float, processes: int = 1) -> str:
    """``memory`` when ``processes`` copies of the cache take at most half of ``available_bytes``, else ``disk``;
    logs the choice in one line (the estimate and the memory it was compared with)."""
    needed = float(estimated_bytes) * max(int(processes), 1)
    choice = "memory" if needed <= 0.5 * available_bytes else "disk"
    _log.info(
        "data.cache=auto: %s (preprocessed cases ~%.2f GB x %d process(es), %.1f GB of memory available)",
        choice, estimated_bytes / 1e9, max(int(processes), 1), available_bytes / 1e9,
    )  # fmt: skip
    return choice
