"""Test-time evaluation: one pass over the test cases whose metrics do not depend on the batch, timed per case."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from medseg.config import CONFIG_DIR, instantiate
from medseg.data.prepare import synthetic
from medseg.evaluation import evaluate_folder, medseg_metrics, read_summary
from medseg.evaluation.timing import PHASES
from medseg.workflows.evaluation import evaluate_model, evaluation_device

# The tiny 2-D UNet of tests/tasks, untrained: its predictions are arbitrary but fixed by the seed, which is all that
# comparing two evaluation paths needs.
TINY = [
    "experiment=synthetic_unet",
    "model.channels=[8,16]",
    "model.strides=[2]",
    "model.num_res_units=1",
    "data.num_workers=0",
    "data.cache=none",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """``(task, datamodule)`` of the tiny UNet on three synthetic test phantoms."""
    root = tmp_path_factory.mktemp("evaluation_data")
    synthetic.build(root, seed=7, num_train=4, num_test=3, shape=(32, 32, 12))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=TINY)
    with open_dict(cfg):
        cfg.paths.data_dir = str(root)
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels)
    task = instantiate(cfg.task, model=model, label_names=datamodule.label_names)
    return task, datamodule


def _metrics(summary):
    return {case["case_id"]: case["metrics"] for case in medseg_metrics(summary)["metric_per_case"]}


def test_metrics_do_not_depend_on_the_slice_batch(run, tmp_path, monkeypatch):
    task, datamodule = run
    monkeypatch.setitem(task.inference, "sw_batch_size", 1)  # one slice at a time: the reference path
    one = evaluate_model(task, datamodule, tmp_path / "one", device="cpu")
    monkeypatch.setitem(task.inference, "sw_batch_size", 64)  # every slice of a volume in one pass
    batched = evaluate_model(task, datamodule, tmp_path / "batched", device="cpu")
    assert one["n_cases"] == batched["n_cases"] == 3
    assert _metrics(batched) == _metrics(one)  # identical labels, hence identical metrics
    for name in _metrics(one):
        a = (tmp_path / "one" / "predictions" / f"{name}.nii.gz").read_bytes()
        assert a == (tmp_path / "batched" / "predictions" / f"{name}.nii.gz").read_bytes()


def test_each_case_is_scored_as_the_folder_evaluation_scores_it(run, tmp_path):
    task, datamodule = run
    summary = evaluate_model(task, datamodule, tmp_path, max_cases=2, device="cpu")
    labels = Path(datamodule.info.test[0].label).parent
    folder = evaluate_folder(tmp_path / "predictions", labels, datamodule.label_names)
    assert summary["n_cases"] == folder["n_cases"] == 2
    assert _metrics(summary) == _metrics(folder)
    assert summary["metric_per_case"] == folder["metric_per_case"]  # nnU-Net's view too
    assert read_summary(tmp_path / "summary.json")["foreground_mean"] == folder["foreground_mean"]


def test_summary_reports_seconds_per_case(run, tmp_path):
    task, datamodule = run
    summary = evaluate_model(task, datamodule, tmp_path, extras={"steps_trained": 0}, device="cpu")
    assert read_summary(tmp_path / "summary.json") == summary
    wall, per_case = summary["eval_wall_time_s"], summary["seconds_per_case"]
    assert wall > 0 and per_case > 0 and per_case == pytest.approx(wall / summary["n_cases"], rel=1e-3, abs=1e-3)
    seconds = [case["seconds"] for case in medseg_metrics(summary)["metric_per_case"]]
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    assert sum(seconds) <= wall  # each case's time is inside the evaluation's
    split = summary["eval_seconds"]
    assert set(split) == {*PHASES, "other"} and all(split[p] > 0 for p in PHASES)
    assert sum(split.values()) == pytest.approx(wall, abs=0.01)
    assert sum(split[p] for p in PHASES) == pytest.approx(sum(seconds), abs=0.01)
    assert summary["steps_trained"] == 0  # the run's own facts are kept


def test_the_evaluation_device_is_cuda_when_there_is_one(monkeypatch):
    assert evaluation_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluation_device(None) == torch.device("cuda")  # a trained module left on the CPU goes back to the GPU
    assert evaluation_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluation_device(None) == torch.device("cpu")


def test_a_promptable_run_is_timed_per_case_too(run, tmp_path, bright_in_box):
    _, datamodule = run
    bright_in_box.spatial_dims = 2
    settings = {"max_clicks": 2, "dice_k": 2, "max_objects": 2, "propagation": None}
    task = SimpleNamespace(model=bright_in_box, evaluation=settings, inference={}, slice_axis=2)
    summary = evaluate_model(task, datamodule, tmp_path, max_cases=2, device="cpu")
    cases = medseg_metrics(summary)["metric_per_case"]
    assert summary["n_cases"] == 2 and set(summary["interactive"]["per_case"]) == {case["case_id"] for case in cases}
    seconds = [case["seconds"] for case in cases]
    assert all(s > 0 for s in seconds) and sum(seconds) <= summary["eval_wall_time_s"]
    assert summary["eval_seconds"]["predict"] > 0 and summary["seconds_per_case"] > 0
    assert bright_in_box.encoded > 0  # the simulated user ran the model
