"""Training randomness as a function of ``(seed, epoch, index)``: the same samples with or without worker processes,
in an uninterrupted run and in a resumed one.

A plain ``shuffle=True`` draws its order (and MONAI's DataLoader its transform seeds) from the global torch RNG at
whatever moment the loader happens to be built or iterated, which differs between a run and its resumption; random
transforms seeded once per worker make each sample depend on which worker drew it, so the batches change with
``num_workers``. Here:

* :class:`EpochSeededSampler` draws the order of an epoch from ``(seed, epoch)``; Lightning (and
  ``medseg.tasks.callbacks.RandomStateCheckpoint`` after a restore) calls :meth:`~EpochSeededSampler.set_epoch`
  before each epoch. Over a :class:`SeededSamples` dataset it yields ``(index, epoch)`` keys, so the epoch travels
  with each index into the workers, which may then live across epochs (``persistent_workers``).
* :class:`SeededSamples` runs the random transforms (slice or patch sampling, augmentation) on a preprocessed case,
  seeded from ``(seed, epoch, index)`` for that one sample. It reads the cached case without copying it: the random
  transforms write new tensors and never into the cached ones (``tests/data/test_datamodule.py`` checks the cache bit
  for bit after several epochs), and they run without MONAI's metadata tracking, which only inversion needs and
  training samples are never inverted.
* :class:`EpochDataLoader` starts an epoch's index stream at its first batch rather than when its iterator is built:
  Lightning builds the first iterator of a resumed run before the epoch is set, and worker processes would otherwise
  prefetch the indices of the wrong epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.data import DataLoader, get_track_meta, set_track_meta
from monai.data.utils import set_rnd
from monai.transforms import Compose, Randomizable
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

__all__ = ["EpochDataLoader", "EpochSeededSampler", "SampleKey", "SeededSamples", "sample_seed"]


class SampleKey(NamedTuple):
    """What :class:`EpochSeededSampler` yields over a :class:`SeededSamples` dataset: the case and the epoch."""

    index: int
    epoch: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample, a well-mixed function of ``(seed, epoch, index)`` (NumPy's ``SeedSequence``), so
    that neighbouring epochs or cases get unrelated random streams."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(1)[0])


@contextmanager
def _untracked() -> Iterator[None]:
    """MONAI's metadata tracking off for the block (a process-wide switch, restored after)."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


class SeededSamples(TorchDataset):
    """The training samples of preprocessed cases: ``random`` applied to ``source[index]``, seeded per sample.

    Args:
        source: the preprocessed cases (a MONAI ``CacheDataset``, ``PersistentDataset`` or ``Dataset`` of the
            deterministic transforms); its items are read, never modified.
        random: the random transforms (sampling, then augmentation); they must not write into their input tensors,
            which MONAI's do not.
        seed: the run's data seed.

    An item is ``self[SampleKey(index, epoch)]``; a plain ``index`` means epoch 0. The result is what ``random``
    returns (a dict, or a list of dicts for multi-sample transforms), with plain tensors: training samples carry no
    MONAI metadata or inversion trace.
    """

    def __init__(self, source: Any, random: Compose | Callable[..., Any], seed: int = 0) -> None:
        self.source, self.seed = source, int(seed)
        self.random = random if isinstance(random, Compose) else Compose([random])
        # One random stream for the whole pipeline, reseeded in place per sample: a new RandomState per transform and
        # sample (MONAI's set_random_state(seed=...)) costs about 0.3 ms each, reseeding a few microseconds.
        self._stream = np.random.RandomState()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey | tuple[int, int] | int) -> Any:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        case = self.source[index]
        self._stream.seed(sample_seed(self.seed, epoch, index))
        for transform in self.random.transforms:  # bound every time: a worker's start (set_rnd) rebinds them
            if isinstance(transform, Randomizable):
                transform.set_random_state(state=self._stream)
        with _untracked():
            return self.random(dict(case))  # a new dict around the cached tensors, not copies of them


class EpochSeededSampler(Sampler):
    """Random order from ``(seed, epoch)``.

    Over a :class:`SeededSamples` dataset it yields :class:`SampleKey` s, and each sample's randomness follows from its
    key: the batches are the same with any number of workers, persistent or not. Over another dataset it yields
    indices and reseeds the dataset's random transforms once per epoch (``set_rnd``); that holds in the main process
    (``num_workers=0``) only, since workers take their seeds from the DataLoader's generator (pass
    ``sampler.generator`` as ``generator=``).

    Under DDP Lightning wraps this sampler in a distributed one that shards its order; the epoch then advances by one
    per pass.
    """

    def __init__(self, dataset: Sized, seed: int = 0) -> None:
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0
        self.generator = torch.Generator()
        self._epoch_was_set = False
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Fix the randomness of ``epoch`` (called by Lightning at each epoch start, before the loader is iterated)."""
        self.epoch, self._epoch_was_set = int(epoch), True
        self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)

    def __iter__(self) -> Iterator[Any]:
        if not self._epoch_was_set:  # a pass without set_epoch (e.g. under a wrapping sampler): next epoch
            self.set_epoch(self.epoch + 1)
        self._epoch_was_set = False
        # Draw from a generator seeded here, not from self.generator: the DataLoader may already have taken worker
        # seeds from that one.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        if isinstance(self.dataset, SeededSamples):
            epoch = self.epoch
            return iter([SampleKey(index, epoch) for index in order])
        set_rnd(self.dataset, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        return iter(order)

    def __len__(self) -> int:
        return len(self.dataset)


class EpochDataLoader(DataLoader):
    """MONAI's DataLoader whose iterator starts (draws its order, hands indices to workers) at the first batch.

    A multi-process iterator takes its first indices from the sampler as soon as it is built. Lightning builds the
    first iterator of a resumed run before it sets the sampler's epoch, so those indices would be the previous
    epoch's; starting the iterator lazily makes every epoch, resumed or not, draw its order after ``set_epoch``.
    """

    def __iter__(self) -> Iterator[Any]:  # a generator: nothing runs until the first next()
        yield from super().__iter__()
