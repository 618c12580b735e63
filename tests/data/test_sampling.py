from __future__ import annotations

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Compose, RandGaussianNoised

from medseg.data.sampling import EpochSeededSampler


def _dataset():
    items = [{"image": torch.zeros(1, 4, 4), "case": i} for i in range(10)]
    return Dataset(items, Compose([RandGaussianNoised(keys="image", prob=1.0, std=1.0)]))


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    order = list(iter(sampler))
    return order, np.asarray(sampler.dataset[order[0]]["image"]).copy()


def test_order_and_augmentation_depend_only_on_seed_and_epoch():
    a, b = EpochSeededSampler(_dataset(), seed=3), EpochSeededSampler(_dataset(), seed=3)
    for epoch in (0, 1, 2):
        _epoch(a, epoch)  # a runs every epoch; b jumps straight to epoch 2, as a resumed run does
    order_a, noise_a = _epoch(a, 2)
    order_b, noise_b = _epoch(b, 2)
    assert order_a == order_b and np.array_equal(noise_a, noise_b)
    a.set_epoch(2)
    torch.randint(0, 10, (5,), generator=a.generator)  # the DataLoader drawing worker seeds in between changes nothing
    assert list(iter(a)) == order_b


def test_epochs_and_seeds_differ():
    sampler = EpochSeededSampler(_dataset(), seed=3)
    assert _epoch(sampler, 0)[0] != _epoch(sampler, 1)[0]
    assert sorted(_epoch(sampler, 1)[0]) == list(range(10))
    assert _epoch(EpochSeededSampler(_dataset(), seed=4), 1)[0] != _epoch(sampler, 1)[0]


def test_a_pass_without_set_epoch_advances_the_epoch():
    sampler = EpochSeededSampler(_dataset(), seed=0)
    first, second = list(iter(sampler)), list(iter(sampler))  # e.g. wrapped by Lightning's DDP sampler
    assert first != second and sampler.epoch == 1
