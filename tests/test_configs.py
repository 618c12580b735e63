"""Every config composes; the framework's groups instantiate; config mistakes are one-line errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from medseg.cli import main
from medseg.config import CONFIG_DIR, instantiate
from medseg.workflows.training import build_callbacks, build_loggers, resolve_precision

CONF = Path(CONFIG_DIR)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides: list[str], tmp_path: Path | None = None, name: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.run_dir = str(tmp_path)
    return cfg


@pytest.mark.parametrize(
    "group",
    ["data", "backbone", "adapter", "model", "trainer", "callbacks", "logger", "experiment", "debug", "init"],
)
def test_every_option_of_every_group_composes(group):
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        assert OmegaConf.to_container(cfg.task, resolve=False)
        assert cfg.hydra.runtime.choices[group] == option


@pytest.mark.parametrize("option", ["joblib", "submitit_slurm"])
def test_launchers_compose(option):
    cfg = _compose([f"launcher={option}"])
    assert option.split("_")[0] in cfg.hydra.launcher._target_.lower()


def test_optuna_search_composes_and_never_looks_at_the_test_cases():
    cfg = _compose(["hparams_search=optuna"])
    assert "optuna" in cfg.hydra.sweeper._target_
    assert cfg.optimized_metric.startswith("val/") and cfg.evaluate is False and cfg.resume is False
    assert "task.optimizer.lr" in cfg.hydra.sweeper.params


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_trainer_callbacks_and_loggers_instantiate(trainer, tmp_path):
    cfg = _compose([f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=1"], tmp_path)
    with open_dict(cfg):
        cfg.trainer.pop("strategy", None)  # DDP itself is tested with two processes in tests/tasks/test_ddp.py
        cfg.trainer.pop("sync_batchnorm", None)
    callbacks, loggers = build_callbacks(cfg), build_loggers(cfg)
    names = {type(c).__name__ for c in callbacks}
    assert {"ModelCheckpoint", "StepProgressBar", "RandomStateCheckpoint"} <= names
    assert {type(lg).__name__ for lg in loggers} == {"CSVLogger", "TensorBoardLogger"}
    trainer_obj = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, precision=resolve_precision(cfg.trainer.precision)
    )
    assert trainer_obj.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")


def test_task_instantiates_with_its_loss_optimiser_and_schedule():
    import torch

    cfg = _compose([])
    model = torch.nn.Conv2d(1, 3, 1)
    model.num_classes = 3
    task = instantiate(cfg.task, model=model, label_names={"background": 0, "a": 1, "b": 2})
    optimizer = task.optimizer_factory(params=task.parameter_groups())
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == cfg.task.optimizer.lr
    assert task.class_names == ["a", "b"]


def test_init_switches_the_backbone_weights_and_nothing_else():
    pretrained = OmegaConf.to_container(_compose(["init=pretrained"]), resolve=False)
    scratch = OmegaConf.to_container(_compose(["init=scratch"]), resolve=False)
    for cfg in (pretrained, scratch):
        cfg.pop("hydra")
    assert pretrained.pop("init") == "pretrained" and scratch.pop("init") == "scratch"
    assert pretrained["backbone"].pop("pretrained") is True and scratch["backbone"].pop("pretrained") is False
    assert pretrained == scratch
    # and the model is built from that switch
    assert _compose(["init=scratch"]).model.pretrained is False


def test_run_folder_layout(tmp_path):
    cfg = _compose(["experiment=quickstart", "init=scratch", f"paths.results_dir={tmp_path}"])
    expected = tmp_path / "mni-tissue" / "litemedsam-vit_unetr__lora__scratch" / "fold_0"
    assert Path(cfg.hydra.run.dir) == expected
    sweep = Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir
    assert sweep == expected  # a multirun job lands in the same folder as the single run: it resumes it


def test_evaluate_config_composes(tmp_path):
    cfg = _compose([f"run_dir={tmp_path}"], name="evaluate")
    assert cfg.ckpt == "best" and Path(cfg.hydra.run.dir) == tmp_path and cfg.hydra.output_subdir is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "adapter=no_such_adapter"], "no_such_adapter"),
        (["train", "trainer.no_such_key=1"], "no_such_key"),
        (["train", "data=nnunet"], "data.dataset"),
        (["train", "adapter=lora,ssf"], "-m"),
        (["train", "-m", "adapter=lora,no_such_adapter"], "no_such_adapter"),
        (["evaluate"], "run_dir"),
    ],
)
def test_config_mistakes_are_one_line_errors(argv, expected, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert expected in err
