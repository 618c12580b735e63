"""A short real training on the synthetic phantoms learns them: test Dice on the native grid, from summary.json."""

from __future__ import annotations

import json

from medseg.evaluation import medseg_metrics
from medseg.workflows.training import train


def test_unet_learns_the_synthetic_organs(train_config, synthetic_root, tmp_path):
    cfg = train_config(
        ["trainer.max_steps=250", "trainer.check_val_every_n_epoch=50", "seed=0"], tmp_path, synthetic_root
    )
    metrics = train(cfg)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_cases"] == 3  # the test cases, never the validation ones
    dice = {name: values["dice"] for name, values in medseg_metrics(summary)["mean"].items()}
    assert summary["foreground_mean"]["dice"] >= 0.8, dice
    assert metrics["test/dice_fg"] == summary["foreground_mean"]["dice"]
    assert "val/dice_resampled" in metrics  # model selection ran on whole validation volumes
    assert summary["trainable_params"] > 0 and summary["wall_time_s"] > 0 and summary["peak_rss_mb"] > 0
    assert summary["steps_trained"] == 250
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "logs" / "csv" / "metrics.csv").is_file()
