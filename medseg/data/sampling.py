"""Epoch-seeded shuffling, so a resumed run replays exactly the epochs an uninterrupted run would have seen.

A plain ``shuffle=True`` draws its order (and MONAI's DataLoader its transform seeds) from the global torch RNG at
whatever moment the loader happens to be built or iterated, which differs between a run and its resumption. Here the
order, the workers' seeds and the random transforms' seeds are functions of ``(seed, epoch)`` only; Lightning calls
:meth:`EpochSeededSampler.set_epoch` before each epoch, and a checkpoint taken at an epoch boundary resumes into
the same epoch the uninterrupted run would have reached.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from monai.data.utils import set_rnd
from torch.utils.data import Sampler

__all__ = ["EpochSeededSampler"]


class EpochSeededSampler(Sampler[int]):
    """Random order from ``(seed, epoch)``; also reseeds the dataset's random transforms for that epoch.

    The order and the random transforms of the main process (``num_workers=0``) are exact functions of the epoch.
    Pass ``sampler.generator`` to the DataLoader as ``generator=`` so that workers' seeds (and MONAI's per-worker
    transform seeds) derive from the epoch too; that holds for every epoch of an uninterrupted run, but the first epoch
    after a resume may get other worker seeds because Lightning builds that iterator before setting the epoch. Under
    DDP Lightning wraps this sampler in a distributed one that shards its order; the epoch then advances each pass.
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

    def __iter__(self) -> Iterator[int]:
        if not self._epoch_was_set:  # a pass without set_epoch (e.g. under a wrapping sampler): next epoch
            self.set_epoch(self.epoch + 1)
        self._epoch_was_set = False
        # Draw from a generator seeded here, not from self.generator: the DataLoader may already have taken worker
        # seeds from that one (Lightning prefetches a batch when it builds the iterator of a resumed run).
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        set_rnd(self.dataset, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        return iter(order)

    def __len__(self) -> int:
        return len(self.dataset)
