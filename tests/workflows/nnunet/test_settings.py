"""An nnU-Net arm's settings: a bad value or a missing extra fails in one line before anything runs."""

from __future__ import annotations

import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from medseg.config import CONFIG_DIR
from medseg.errors import ConfigError
from medseg.workflows.nnunet.settings import MISSING_EXTRA, NnunetSettings
from medseg.workflows.training import train


def _config(*overrides: str, run_dir=None, arm: str = "2d"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["trainer=cpu", f"+nnunet={arm}", *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir or "/nonexistent/run")
    return cfg


def test_the_config_groups_select_nnunets_configuration_and_name_the_run():
    settings = NnunetSettings.from_config(_config("trainer.max_steps=7", "nnunet.lr=0.003", "seed=4"))
    assert (settings.configuration, settings.max_steps, settings.lr, settings.device, settings.seed) == (
        "2d", 7, 0.003, "cpu", 4,
    )  # fmt: skip
    assert settings.epochs() == 1 and settings.use_mirroring and settings.lr is not None
    assert NnunetSettings.from_config(_config("trainer.max_steps=501")).epochs() == 3  # 250 + 250 + 1
    assert NnunetSettings.from_config(_config()).lr is None  # nnU-Net's own 1e-2 unless nnunet.lr is given
    cfg = _config(arm="3d_fullres")
    assert cfg.nnunet.configuration == "3d_fullres" and cfg.nnunet.iterations_per_epoch == 250
    assert (cfg.model_name, cfg.adapter_name, cfg.init) == ("nnunet-3d_fullres", "none", "scratch")
    settings = NnunetSettings.from_config(cfg)
    assert NnunetSettings.from_json(settings.to_json()) == settings


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nnunet.configuration=3d", r"nnunet.configuration='3d' must be one of"),
        ("trainer.max_steps=-1", r"trainer.max_steps=-1: an nnU-Net arm trains a number of iterations"),
        ("nnunet.iterations_per_epoch=0", r"nnunet.iterations_per_epoch=0 must be a whole number >= 1"),
        ("nnunet.lr=-0.1", r"nnunet.lr=-0.1 must be a positive number"),
        ("nnunet.tile_step_size=1.5", r"nnunet.tile_step_size=1.5 must be in \(0, 1\]"),
        ("+nnunet.epochs=3", r"nnunet has unknown keys \['epochs'\]"),
        ("trainer.accelerator=tpu", r"trainer.accelerator='tpu': nnU-Net arms run on"),
    ],
)
def test_a_bad_setting_is_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        NnunetSettings.from_config(_config(override))
    assert "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU where there is none")
def test_a_gpu_run_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu but no CUDA device is visible"):
        NnunetSettings.from_config(_config("trainer.accelerator=gpu"))


def test_without_nnunetv2_the_arm_fails_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # what an environment without the extra sees
    with pytest.raises(ConfigError) as error:
        train(_config(run_dir=tmp_path / "run"))
    assert str(error.value) == MISSING_EXTRA == "nnU-Net arms need the nnunet extra: pip install 'medseg[nnunet]'"
    assert not (tmp_path / "run").exists()  # refused before the run folder was touched
