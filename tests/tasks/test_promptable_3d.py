"""3-D PromptableTask: roi-shaped patches, a short real training on synthetic 3-D patches, 3-D interactive summary."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
import torch

from medseg.config import instantiate
from medseg.errors import ConfigError
from medseg.evaluation.summary import is_complete, medseg_metrics, read_summary
from medseg.tasks.promptable import PromptableTask
from medseg.workflows.training import train

# A tiny volumetric SAM (2 ViT blocks of width 32, 32 x 32 x 16 roi) trained for a few dozen steps; the validation
# and the test-time evaluation (sliding windows over whole volumes, one predict per click) are capped to stay fast.
PROMPTABLE_3D = [
    "experiment=promptable_synthetic_3d",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "data.sampling.num_samples=1",
    "task.num_iterations=3",
    "task.val_clicks=[1,2]",
    "task.evaluation.max_clicks=3",
    "task.evaluation.dice_k=3",
    "task.evaluation.max_objects=1",
    "++trainer.num_sanity_val_steps=0",
    "++trainer.limit_val_batches=1",
    "seed=0",
]
STEPS = 40


_RUNS: dict[str, tuple] = {}  # compose_config is function-scoped: the one training run is kept here


@pytest.fixture
def trained_run_3d(one_thread, synthetic_root, tmp_path_factory, compose_config):
    if "run" not in _RUNS:
        run_dir = tmp_path_factory.mktemp("promptable_3d_run")
        # 9 training volumes, 2 per step: 5 steps an epoch, so validation runs once, after the last step
        overrides = [*PROMPTABLE_3D, f"trainer.max_steps={STEPS}", "trainer.check_val_every_n_epoch=8"]
        started = time.perf_counter()
        metrics = train(compose_config(overrides, run_dir, synthetic_root))
        _RUNS["run"] = (run_dir, metrics, time.perf_counter() - started)
    return _RUNS["run"]


def test_3d_config_composes_and_checks_patches_against_the_non_cubic_roi(
    one_thread, synthetic_root, tmp_path, compose_config
):
    cfg = compose_config(PROMPTABLE_3D, tmp_path, synthetic_root)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels)
    task = instantiate(cfg.task, model=model, label_names=datamodule.label_names)
    assert isinstance(task, PromptableTask) and task.spatial_dims == 3 and model.roi_size == (32, 32, 16)
    assert list(cfg.data.sampling.patch_size) == [32, 32, 16]
    task._check_batch(torch.zeros(2, 1, 32, 32, 16))  # the non-cubic roi: no cube of image_size (32) is expected
    with pytest.raises(ConfigError, match=r"data.sampling.patch_size=\[32, 32, 16\]"):
        task._check_batch(torch.zeros(2, 1, 32, 32, 32))
    with pytest.raises(ConfigError, match="patches_3d"):
        task._check_batch(torch.zeros(2, 1, 32, 32))
    # one real training step on a batch of the configured 3-D patches
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert tuple(batch["image"].shape[2:]) == (32, 32, 16)
    loss = task.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and model.mask_decoder is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_3d_validation_slides_windows_over_the_whole_volume(one_thread, synthetic_root, tmp_path, compose_config):
    cfg = compose_config(PROMPTABLE_3D, tmp_path, synthetic_root)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels)
    task = instantiate(cfg.task, model=model, label_names=datamodule.label_names)
    image = torch.rand(1, 40, 36, 20) * 100
    label = torch.zeros(1, 40, 36, 20)
    label[0, 5:30, 4:20, 3:17] = 1  # larger than the roi along X
    ((inputs, reference),) = task.validation_samples(image, label)
    assert inputs.shape == (1, 1, 40, 36, 20) and reference.shape == (40, 36, 20)  # not squeezed into one roi
    assert float(inputs.min()) == 0.0 and float(inputs.max()) == pytest.approx(1.0)
    task.on_validation_epoch_start()
    task.validation_step({"image": image[None], "label": label[None]}, 0)
    assert float(task._val_count) == 1 and all(0.0 <= float(v) <= 1.0 for v in task._val_sum)
    assert task.model.training  # sliding-window prediction gives the mode back


def test_trained_3d_model_learns_and_writes_the_3d_interactive_summary(trained_run_3d):
    run_dir, metrics, seconds = trained_run_3d
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(losses) == STEPS
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.95 * first, (first, last)  # measured 0.87 (seeded); 0.95 leaves room for other CPUs

    summary = read_summary(run_dir / "summary.json")
    assert is_complete(run_dir / "summary.json") and summary["n_cases"] == 3
    section = summary["interactive"]
    assert section["max_clicks"] == 3 and set(section["per_case"]) == {
        c["case_id"] for c in medseg_metrics(summary)["metric_per_case"]
    }
    for case in section["per_case"].values():
        (obj,) = case["objects"]  # max_objects=1
        assert obj["n_voxels"] > 0 and len(obj["dice_at_k"]) == 3 and 1 <= obj["clicks"] <= 3
        assert all(0.0 <= d <= 1.0 for d in obj["dice_at_k"]) and 1 <= obj["noc85"] <= obj["noc90"] <= 3
        assert 0.0 <= obj["box_dice"] <= 1.0 and obj["propagation_dice"] is None  # a 2-D-model metric
    fg = section["foreground_mean"]
    assert len(fg["dice_at_k"]) == 3 and "noc85" in fg and "box_dice" in fg and "propagation_dice" not in fg
    # a few dozen steps learn the object: the 3-D box and the clicks give far better than chance overlap
    assert fg["box_dice"] > 0.3 and max(fg["dice_at_k"]) > 0.3, fg
    assert metrics["test/dice_click1"] == pytest.approx(fg["dice_at_k"][0]) and "test/propagation_dice" not in metrics
    assert "val/dice_click1" in metrics and "val/dice_click2" in metrics
    assert all((run_dir / "predictions" / f"{c}.nii.gz").is_file() for c in section["per_case"])
    assert 0.0 <= summary["foreground_mean"]["dice"] <= 1.0  # the box-prompt masks, scored on the native grid
    assert seconds < 150, seconds
