"""cost.csv's compute columns: FLOPs per step and per run, matched_by, device-hours, an nnU-Net run's own numbers."""

from __future__ import annotations

import math

import pytest
import yaml

from medseg.benchmark.collect import COST_COLUMNS, cost_table

SCORES = {"liver": {"dice": 0.5, "nsd": 0.6, "hd95": 3.0}}


def _run(tmp_path, arm, summary, devices=1, batch=1, samples=2, lr=1e-3, job=None):
    run_dir = tmp_path / arm
    (run_dir / ".hydra").mkdir(parents=True)
    config = {"data": {"batch_size": batch, "sampling": {"num_samples": samples}}, "trainer": {"devices": devices}}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    base = {"dataset": "D", "metric_per_case": [{"case_id": "c1", "metrics": SCORES}], "n_cases": 1}
    return {"arm": arm, "lr": lr, "run_dir": run_dir, "summary": {**base, **summary}, "job": job}


def test_compute_columns_from_the_runners_count_and_from_nnunets_summary(tmp_path):
    runs = [
        _run(tmp_path, "vit", {"steps_trained": 10, "train_wall_time_s": 1800.0, "eval_wall_time_s": 1800.0},
             devices=2),
        _run(tmp_path, "nnunet_2d", {"steps_trained": 10, "train_wall_time_s": 360.0, "eval_wall_time_s": 0.0,
                                     "nnunet": {"batch_size": 12, "train_flops_per_step": 5.0e9,
                                                "train_flops_note": "one step on a batch of (12, 1, 64, 64)"}},
             lr=None, job={"peak_rss_mb": 900.0, "peak_gpu_memory_mb": 2000.0}),
        _run(tmp_path, "old_nnunet", {"steps_trained": 10, "train_wall_time_s": 1.0, "nnunet": {"batch_size": 4}}),
    ]  # fmt: skip
    compute = {"vit": {"flops_per_step": 2.0e12, "note": "one step on a batch of (2, 1, 256, 256)",
                       "matched_by": "compute"}, "nnunet_2d": {"flops_per_step": None, "note": "n/a"}}  # fmt: skip
    table = cost_table(runs, {"vit": 3600.0}, compute)
    assert list(table.columns) == COST_COLUMNS
    cost = table.set_index("arm")
    assert cost.loc["vit", "train_flops"] == pytest.approx(2.0e13) and cost.loc["vit", "matched_by"] == "compute"
    # (1800 + 1800 s of the final run + 3600 s of search) x 2 devices = 4 device-hours
    assert cost.loc["vit", "device_hours"] == pytest.approx(4.0)
    assert cost.loc["vit", "samples_per_step"] == 2
    nnunet = cost.loc["nnunet_2d"]
    assert nnunet["flops_per_step"] == 5.0e9 and nnunet["train_flops"] == pytest.approx(5.0e10)
    assert nnunet["flops_note"].startswith("nnU-Net worker: one step") and nnunet["matched_by"] == "steps"
    assert nnunet["samples_per_step"] == 12 and nnunet["peak_gpu_memory_mb"] == 2000.0
    assert nnunet["peak_rss_mb"] == 900.0 and math.isnan(nnunet["lr"])
    assert nnunet["device_hours"] == pytest.approx(0.1)
    old = cost.loc["old_nnunet"]
    assert math.isnan(old["flops_per_step"]) and "no FLOP count" in old["flops_note"]
