"""The runner on a tiny synthetic grid: every output, resume without retraining, a crashing arm, the lr search."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import medseg.benchmark.jobs
from medseg.benchmark.grid import search_jobs
from medseg.benchmark.runner import OUTPUTS, _compose, load_settings, run_benchmark
from medseg.config import CONFIG_DIR
from medseg.errors import ConfigError


def _count_training(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = medseg.benchmark.jobs.train

    def counting(cfg):
        calls.append(str(cfg.run_dir))
        return real(cfg)

    monkeypatch.setattr(medseg.benchmark.jobs, "train", counting)
    return calls


def test_tiny_grid_writes_every_output_and_a_rerun_trains_nothing(bench_env, tiny_grid, monkeypatch):
    calls = _count_training(monkeypatch)
    assert run_benchmark(tiny_grid) == 0
    assert len(calls) == 3  # pretrained, scratch, unet_plain: 1 fraction x 1 seed, no search (one lr)
    for name in (*OUTPUTS[:-2], "report.md", "metric_vs_label_fraction.png", "metric_vs_train_time.png"):
        assert (bench_env / name).is_file(), name
    per_case = pd.read_csv(bench_env / "per_case.csv")
    assert list(per_case.columns) == ["arm", "dataset", "label_fraction", "seed", "case", "metric", "value"]
    assert set(per_case["arm"]) == {"pretrained", "scratch", "unet_plain"}
    assert per_case["case"].nunique() == 2 and {"dice", "hd95", "nsd", "dice/liver"} <= set(per_case["metric"])
    summary = pd.read_csv(bench_env / "summary.csv")
    assert {"arm", "metric", "mean", "ci_low", "ci_high", "n"} <= set(summary.columns)
    assert (summary["ci_low"] <= summary["mean"]).all() and (summary["mean"] <= summary["ci_high"]).all()
    comparisons = pd.read_csv(bench_env / "comparisons.csv")
    expected = ["arm_a", "arm_b", "metric", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "verdict"]
    assert set(expected) <= set(comparisons.columns)
    assert {"pretrained_vs_scratch", "vs_best_baseline"} <= set(comparisons["kind"])
    cost = pd.read_csv(bench_env / "cost.csv")
    assert {"trainable_params", "peak_rss_mb", "train_wall_time_s", "train_samples_per_s"} <= set(cost.columns)
    assert (cost["trainable_params"] > 0).all() and (cost["steps"] == 2).all()
    assert (cost["eval_seconds_per_case"] > 0).all()
    seconds = per_case[per_case["metric"] == "seconds"]
    assert len(seconds) == 3 * 2 and (seconds["value"] > 0).all()  # every case of every run is timed
    arms = cost.set_index("arm")
    for arm, spent in seconds.groupby("arm")["value"].sum().items():  # one run per arm here
        wall = arms.loc[arm, "eval_wall_time_s"]
        assert spent <= wall and arms.loc[arm, "eval_seconds_per_case"] * 2 == pytest.approx(wall, abs=2e-3)
    report = (bench_env / "report.md").read_text()
    assert "## Limitations" in report and "pretrained_vs_scratch" in report

    calls.clear()
    assert run_benchmark(tiny_grid) == 0
    assert calls == []  # every run has a complete summary.json: nothing is retrained
    (bench_env / "runs" / "scratch" / "frac_1" / "seed_0" / "summary.json").unlink()  # as if killed before the end
    assert run_benchmark(tiny_grid) == 0
    assert len(calls) == 1 and calls[0].endswith("scratch/frac_1/seed_0")


def test_a_crashing_arm_is_reported_and_the_others_finish(bench_env, tiny_grid):
    # a UNet with one level: MONAI refuses to build it, inside the run (the config composes fine)
    broken = ["~benchmark.baselines", "+benchmark.baselines={broken:['model.channels=[8]']}"]
    assert run_benchmark([*tiny_grid, *broken]) == 1
    job = json.loads((bench_env / "runs" / "broken" / "frac_1" / "seed_0" / "job.json").read_text())
    assert job["status"] == "failed" and job["error"]
    report = (bench_env / "report.md").read_text()
    assert "## Failed runs" in report and "broken" in report
    per_case = pd.read_csv(bench_env / "per_case.csv")
    assert set(per_case["arm"]) == {"pretrained", "scratch"}


def test_lr_search_uses_validation_only_and_picks_the_best(bench_env, tiny_grid, monkeypatch):
    calls = _count_training(monkeypatch)
    fixed = "+benchmark.baselines={fixed:{overrides:['model.num_res_units=0','task.optimizer.lr=0.005'],search:false}}"
    grid = [*tiny_grid, "benchmark.lr_search.values=[1e-4,3e-2]", "~benchmark.baselines", fixed,
            "~benchmark.arms", "+benchmark.arms={init:[scratch]}"]  # fmt: skip
    assert run_benchmark(grid) == 0
    assert len(calls) == 4  # two search runs, one final run per arm (the fixed baseline is not searched)
    table = pd.read_csv(bench_env / "lr_search.csv")
    unsearched = table[table["status"] == "not searched"]
    assert unsearched["arm"].tolist() == ["fixed"] and "search: false" in unsearched["note"].item()
    assert not unsearched["chosen"].item()
    fixed_job = json.loads((bench_env / "runs" / "fixed" / "frac_1" / "seed_0" / "job.json").read_text())
    assert [o for o in fixed_job["overrides"] if "optimizer.lr" in o] == ["task.optimizer.lr=0.005"]
    assert "fixed" in (bench_env / "report.md").read_text().split("### Arms")[1].split("## Results")[0]
    search = table[table["status"] != "not searched"]
    assert len(search) == 2 and search["status"].eq("ok").all()
    best = search.loc[search["val/dice_resampled"].idxmax(), "lr"]
    assert search.loc[search["chosen"], "lr"].tolist() == [best]
    for run_dir in search["run_dir"]:
        overrides = json.loads((Path(run_dir) / "job.json").read_text())["overrides"]
        assert "evaluate=false" in overrides  # the search never predicts the test cases
        assert not (Path(run_dir) / "summary.json").exists()
    final = json.loads((bench_env / "runs" / "scratch" / "frac_1" / "seed_0" / "job.json").read_text())
    assert f"task.optimizer.lr={best}" in final["overrides"]


def test_settings_errors_name_the_field(bench_env):
    with pytest.raises(ConfigError, match="needs an experiment"):
        load_settings(["trainer.max_steps=2"])
    with pytest.raises(ConfigError, match="label_fractions"):
        load_settings(["experiment=bench_synthetic", "benchmark.label_fractions=[0.0]"])
    with pytest.raises(ConfigError, match="same training budget"):
        run_benchmark(
            [
                "experiment=bench_synthetic",
                "~benchmark.baselines",
                "+benchmark.baselines={long:['trainer.max_steps=9']}",
            ]
        )


def test_compute_matched_arms_train_the_same_flops(bench_env, tiny_grid):
    assert run_benchmark([*tiny_grid, "+benchmark.match=compute"]) == 0  # "+": a key the experiment does not set
    cost = pd.read_csv(bench_env / "cost.csv").set_index("arm")
    assert set(cost["matched_by"]) == {"compute"}
    budget = 2 * cost.loc["pretrained", "flops_per_step"]  # null budget: trainer.max_steps x the first arm's FLOPs
    plain = cost.loc["unet_plain"]  # no residual units: cheaper steps, so more of them
    assert plain["flops_per_step"] < cost.loc["pretrained", "flops_per_step"]
    assert plain["steps"] == round(budget / plain["flops_per_step"]) > 2
    assert cost["train_flops"].max() / cost["train_flops"].min() < 1.5  # equal compute, up to whole steps
    assert "matched by compute" in (bench_env / "report.md").read_text()


def test_the_cpu_demo_has_an_unsearched_nnunet_baseline():
    settings, _ = load_settings(["experiment=bench_mni_tissue"])
    nnunet = {arm.name: arm for arm in settings.arms}["nnunet_2d"]
    assert nnunet.nnunet and nnunet.baseline and not nnunet.search
    assert settings.searched and "nnunet_2d" not in {job.arm for job in search_jobs(settings, [], 4)}
    cfg, _ = _compose(["experiment=bench_mni_tissue", *nnunet.overrides])
    assert (cfg.nnunet.configuration, cfg.nnunet.da_processes, cfg.nnunet.use_mirroring) == ("2d", 0, False)
    assert int(cfg.trainer.max_steps) == 4  # the small demo stays small


def test_the_gpu_experiment_composes_with_converging_budgets():
    settings, cfg = load_settings(["experiment=bench_mni_tissue_gpu"])
    assert int(cfg.trainer.max_steps) >= 2000 and len(settings.seeds) >= 3
    assert settings.label_fractions == [0.1, 0.33, 1.0]
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    arms = {arm.name: arm for arm in settings.arms}
    assert arms["nnunet_2d"].nnunet and not arms["nnunet_2d"].search and len(settings.lr_values) >= 2
    for arm in settings.arms:  # every arm's own overrides compose too
        _compose(["experiment=bench_mni_tissue_gpu", *arm.overrides])
    header = Path(CONFIG_DIR, "experiment", "bench_mni_tissue_gpu.yaml").read_text().split("defaults:")[0]
    assert "Expected wall time on one H200" in header and "ESTIMATE" in header
