"""A tiny synthetic dataset and the runner's tiny-grid overrides, shared by the benchmark tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.data.prepare import synthetic

# experiment=bench_synthetic trimmed further: one seed, one fraction, a 1-step budget, two grid arms + a baseline.
TINY_GRID = [
    "experiment=bench_synthetic",
    "trainer.max_steps=2",
    "benchmark.seeds=[0]",
    "benchmark.label_fractions=[1.0]",
    "benchmark.lr_search.values=[1e-2]",
    "benchmark.statistics.n_resamples=500",
    "~benchmark.arms",
    "+benchmark.arms={init:[pretrained,scratch]}",
]


@pytest.fixture(scope="session")
def bench_data(tmp_path_factory) -> Path:
    """Six training and two test phantoms of 32 x 32 x 16 voxels."""
    root = tmp_path_factory.mktemp("bench_data")
    synthetic.build(root, seed=5, num_train=8, num_test=2, shape=(32, 32, 16))
    return root


@pytest.fixture
def bench_env(bench_data, tmp_path, monkeypatch) -> Path:
    """``MEDSEG_DATA``/``MEDSEG_RESULTS`` for a benchmark under ``tmp_path``; returns the benchmark's folder."""
    monkeypatch.setenv("MEDSEG_DATA", str(bench_data))
    monkeypatch.setenv("MEDSEG_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results" / "benchmarks" / "bench_synthetic"


@pytest.fixture
def tiny_grid() -> list[str]:
    """The overrides of the tiny grid (a copy: tests may extend it)."""
    return list(TINY_GRID)
