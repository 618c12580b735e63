"""Loader settings and the cache mode chosen from the machine; explicit values always win."""

from __future__ import annotations

import logging

import pytest
from torch.utils.data import DataLoader

from medseg.data.loader_settings import (
    LoaderSettings,
    cached_bytes,
    choose_cache,
    machine_cpus,
    resolve_loader_settings,
)
from medseg.errors import ConfigError


def test_cuda_machine_gets_workers_persistence_pinning_and_prefetch():
    settings = resolve_loader_settings(cuda=True, cpus=16)
    assert settings == LoaderSettings(num_workers=8, persistent_workers=True, pin_memory=True, prefetch_factor=4)
    assert resolve_loader_settings(cuda=True, cpus=6).num_workers == 5  # one core left to the training process
    assert resolve_loader_settings(cuda=True, cpus=16, processes=4).num_workers == 3  # DDP ranks share the CPUs
    assert resolve_loader_settings(cuda=True, cpus=1).num_workers == 0


def test_small_cpu_machine_loads_in_the_training_process():
    settings = resolve_loader_settings(cuda=False, cpus=2)
    assert settings == LoaderSettings(num_workers=0, persistent_workers=False, pin_memory=False, prefetch_factor=None)
    assert resolve_loader_settings(cuda=False, cpus=8).num_workers == 2
    assert resolve_loader_settings(cuda=False, cpus=64).num_workers == 4


def test_explicit_values_override_auto():
    settings = resolve_loader_settings(
        num_workers=3, persistent_workers=False, pin_memory=False, prefetch_factor=7, cuda=True, cpus=16
    )
    assert settings == LoaderSettings(num_workers=3, persistent_workers=False, pin_memory=False, prefetch_factor=7)
    assert resolve_loader_settings(num_workers=1, cuda=False, cpus=2).persistent_workers  # auto follows the workers
    assert resolve_loader_settings(num_workers=0, cuda=True, cpus=16).prefetch_factor is None
    assert resolve_loader_settings(num_workers="AUTO", cuda=False, cpus=2).num_workers == 0
    assert resolve_loader_settings(num_workers=None, cuda=False, cpus=2).num_workers == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_workers", -1), ("num_workers", "four"), ("num_workers", 1.5), ("num_workers", True),
     ("pin_memory", "yes"), ("persistent_workers", 1), ("prefetch_factor", 0)],
)  # fmt: skip
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"data.{field} must be") as error:
        resolve_loader_settings(**{field: value}, cuda=False, cpus=4)
    assert "\n" not in str(error.value)


def test_loader_kwargs_build_a_torch_dataloader():
    for settings in (resolve_loader_settings(cuda=False, cpus=2), resolve_loader_settings(cuda=True, cpus=4)):
        loader = DataLoader(list(range(4)), batch_size=2, **settings.loader_kwargs())
        assert loader.num_workers == settings.num_workers
        assert loader.persistent_workers == settings.persistent_workers
        assert loader.pin_memory == settings.pin_memory


def test_machine_cpus_is_positive():
    assert machine_cpus() >= 1


def test_cached_bytes_on_the_target_grid():
    # 10 x 10 x 10 voxels of 2 mm resampled to 1 mm: 20^3 voxels, float32 image and uint8 label = 5 bytes each
    assert cached_bytes([(10, 10, 10)], [(2.0, 2.0, 2.0)], (1.0, 1.0, 1.0), num_channels=1) == 20**3 * 5
    assert cached_bytes([(10, 10, 10)], [(2.0, 2.0, 2.0)], None, num_channels=2) == 10**3 * 9
    two = cached_bytes([(10, 10, 10), (4, 4, 4)], [(1.0, 1.0, 1.0)] * 2, (1.0, 1.0, 1.0), num_channels=1)
    assert two == (10**3 + 4**3) * 5
    with pytest.raises(ValueError, match="2 shapes but 1 spacings"):
        cached_bytes([(1, 1, 1), (1, 1, 1)], [(1.0, 1.0, 1.0)], None, 1)


def test_cache_auto_chooses_by_size_and_says_so_in_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="medseg.data.loader_settings"):
        assert choose_cache(int(1e9), available_bytes=8e9) == "memory"
        assert choose_cache(int(5e9), available_bytes=8e9) == "disk"
        assert choose_cache(int(1e9), available_bytes=8e9, processes=8) == "disk"  # each DDP rank holds a copy
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert lines[0].startswith("data.cache=auto: memory") and "1.00 GB" in lines[0]
    assert lines[1].startswith("data.cache=auto: disk")
