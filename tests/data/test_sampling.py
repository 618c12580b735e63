"""Training randomness from (seed, epoch, case): order, per-sample seeds, workers and the lazily started loader."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import Dataset, MetaTensor, get_track_meta
from monai.transforms import Compose, RandGaussianNoised

from medseg.data.sampling import EpochDataLoader, EpochSeededSampler, SampleKey, SeededSamples


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


# --- per-sample seeding: SeededSamples, SampleKey, EpochDataLoader ----------------------------------------------------


def _seeded(seed=3):
    source = [{"image": torch.zeros(1, 4, 4), "case": i} for i in range(6)]
    random = Compose([RandGaussianNoised(keys="image", prob=1.0, std=1.0), RandGaussianNoised(keys="image", prob=0.5)])
    return source, SeededSamples(source, random, seed=seed)


def test_a_sample_depends_on_seed_epoch_and_case_only():
    source, dataset = _seeded()
    first = dataset[SampleKey(2, 5)]["image"].clone()
    dataset[SampleKey(4, 1)]  # other samples drawn in between change nothing
    assert torch.equal(dataset[SampleKey(2, 5)]["image"], first)
    assert torch.equal(_seeded()[1][(2, 5)]["image"], first)  # a fresh copy (another worker) agrees
    assert not torch.equal(dataset[SampleKey(2, 6)]["image"], first)  # next epoch: other noise
    assert not torch.equal(dataset[SampleKey(3, 5)]["image"], first)  # other case: other noise
    assert not torch.equal(_seeded(seed=4)[1][SampleKey(2, 5)]["image"], first)
    assert torch.equal(dataset[2]["image"], dataset[SampleKey(2, 0)]["image"])  # a bare index is epoch 0
    assert all(float(item["image"].abs().sum()) == 0 for item in source)  # the source is read, never written


def test_samples_are_plain_tensors_and_the_tracking_switch_is_restored():
    source = [{"image": MetaTensor(torch.zeros(1, 4, 4))}]
    dataset = SeededSamples(source, RandGaussianNoised(keys="image", prob=1.0, std=1.0))
    assert type(dataset[0]["image"]) is torch.Tensor
    assert get_track_meta()
    assert type(source[0]["image"]) is MetaTensor and not source[0]["image"].applied_operations


def test_the_sampler_yields_epoch_keys_over_seeded_samples():
    _, dataset = _seeded()
    sampler = EpochSeededSampler(dataset, seed=3)
    sampler.set_epoch(4)
    keys = list(iter(sampler))
    assert sorted(k.index for k in keys) == list(range(6)) and {k.epoch for k in keys} == {4}
    plain = EpochSeededSampler(list(range(6)), seed=3)
    plain.set_epoch(4)
    assert [k.index for k in keys] == list(iter(plain))  # the order is the same as over any dataset of that size


def _batches(num_workers, epochs=(0, 1), persistent=False):
    _, dataset = _seeded()
    sampler = EpochSeededSampler(dataset, seed=3)
    extra = {"persistent_workers": persistent} if num_workers else {}
    loader = EpochDataLoader(dataset, batch_size=4, sampler=sampler, num_workers=num_workers, **extra)
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append([(batch["case"].tolist(), batch["image"].clone()) for batch in loader])
    return out


def test_workers_persistent_or_not_give_the_batches_of_the_main_process():
    main = _batches(0)
    assert [c for c, _ in main[0]] != [c for c, _ in main[1]]  # epochs differ in order ...
    for workers, persistent in ((2, False), (1, True)):
        other = _batches(workers, persistent=persistent)
        for epoch_a, epoch_b in zip(main, other, strict=True):
            assert [c for c, _ in epoch_a] == [c for c, _ in epoch_b]
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(epoch_a, epoch_b, strict=True))


def test_the_loader_draws_its_order_at_the_first_batch_not_when_its_iterator_is_built():
    _, dataset = _seeded()
    sampler = EpochSeededSampler(dataset, seed=3)
    loader = EpochDataLoader(dataset, batch_size=6, sampler=sampler, num_workers=1)
    iterator = iter(loader)  # what Lightning does before it sets the epoch of a resumed run
    sampler.set_epoch(3)
    batch = next(iterator)
    sampler.set_epoch(3)
    assert batch["case"].tolist() == [k.index for k in iter(sampler)]
    assert {int(e) for e in batch["case"]} == set(range(6))
