"""Compose ``conf/train.yaml`` as ``medseg train`` would, with the run folder and data under ``tmp_path``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from medseg.config import CONFIG_DIR
from medseg.data.prepare import synthetic

# A small, fast 2D UNet on coarse synthetic volumes: enough to learn the phantoms' organs on CPU in about a minute.
TINY = [
    "experiment=synthetic_unet",
    "model.channels=[16,32,64,128]",
    "model.strides=[2,2,2]",
    "model.num_res_units=1",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
]


def compose_train(overrides: list[str], run_dir: Path, data_root: Path | None = None) -> DictConfig:
    """The config of ``medseg train <overrides>``, with ``run_dir`` set as Hydra would set it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        if data_root is not None:
            cfg.paths.data_dir = str(data_root)
    return cfg


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Twelve training and three test phantoms, small enough for CPU tests."""
    root = tmp_path_factory.mktemp("synthetic_data")
    synthetic.build(root, seed=3, num_train=12, num_test=3, shape=(48, 48, 24))
    return root


@pytest.fixture
def train_config():
    """``compose_train(overrides, run_dir, data_root)`` with the tiny-UNet overrides first."""

    def make(overrides: list[str], run_dir: Path, data_root: Path | None = None) -> DictConfig:
        return compose_train([*TINY, *overrides], run_dir, data_root)

    return make


@pytest.fixture(scope="session")
def small_synthetic_root(tmp_path_factory) -> Path:
    """Eight tiny training phantoms (resume and DDP tests: a few steps, not learning)."""
    root = tmp_path_factory.mktemp("small_synthetic")
    synthetic.build(root, seed=5, num_train=8, num_test=1, shape=(32, 32, 16))
    return root


@pytest.fixture
def compose_config():
    """:func:`compose_train` itself, for tests that compose other experiments than the tiny UNet."""
    return compose_train


@pytest.fixture
def ddp_digests(small_synthetic_root, tmp_path) -> Callable[..., tuple[list[str], list[str], Path]]:
    """Train ``medseg.train <overrides>`` as DDP on 2 CPU processes (gloo); each rank's weights digest and step count,
    and the run folder: ``(rank0, rank1, run_dir)`` with ``rank = [digest, steps]``."""

    def run(overrides: list[str], steps: int, timeout: int = 600) -> tuple[list[str], list[str], Path]:
        run_dir, digests = tmp_path / "run", tmp_path / "digests"
        command = [
            sys.executable, "-m", "medseg.train", *overrides, "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.precision=32-true", "trainer.sync_batchnorm=false",
            f"trainer.max_steps={steps}", "evaluate=false", "resume=false",
            "+callbacks.weights_digest._target_=medseg.tasks.callbacks.WeightsDigest",
            f"+callbacks.weights_digest.output_dir={digests}",
            f"paths.data_dir={small_synthetic_root}", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSEG_DATA": str(small_synthetic_root)}
        result = subprocess.run(
            command, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=timeout
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return (digests / "rank0.txt").read_text().split(), (digests / "rank1.txt").read_text().split(), run_dir

    return run
