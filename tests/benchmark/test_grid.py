"""The grid: nnU-Net and other unsearched arms, their jobs, and compute-matched step budgets."""

from __future__ import annotations

import pytest

from medseg.benchmark.grid import BenchmarkSettings, final_jobs, parse_arms, search_jobs
from medseg.errors import ConfigError


def _settings(**extra) -> BenchmarkSettings:
    node = {"arms": {"init": ["pretrained", "scratch"]},
            "baselines": {"unet": ["model=unet_2d"], "nnunet_2d": ["+nnunet=2d", "nnunet.da_processes=0"],
                          "fixed": {"overrides": ["model=unet_2d", "task.optimizer.lr=0.01"], "search": False}},
            "label_fractions": [0.5, 1.0], "seeds": [0, 1], "lr_search": {"values": [1e-4, 1e-3]}, "metrics": ["dice"],
            **extra}  # fmt: skip
    return BenchmarkSettings.from_config("bench_test", node)


def test_nnunet_and_search_false_baselines_are_not_searched():
    settings = _settings()
    flags = {arm.name: (arm.search, arm.nnunet) for arm in settings.arms}
    assert flags == {"pretrained": (True, False), "scratch": (True, False), "unet": (True, False),
                     "nnunet_2d": (False, True), "fixed": (False, False)}  # fmt: skip
    searched = search_jobs(settings, [], 4)
    assert sorted({job.arm for job in searched}) == ["pretrained", "scratch", "unet"] and len(searched) == 6
    assert all("+trainer.val_check_interval=4" in job.overrides for job in searched)


def test_final_jobs_of_an_unsearched_arm_carry_no_learning_rate():
    settings = _settings()
    chosen = {"pretrained": 1e-3, "scratch": 1e-4, "unet": 1e-3, "nnunet_2d": None, "fixed": None}
    jobs = final_jobs(settings, chosen, ["trainer.max_steps=4"])
    assert len(jobs) == 5 * 2 * 2
    for job in jobs:
        lrs = [o for o in job.overrides if o.startswith("task.optimizer.lr=")]
        if job.arm == "nnunet_2d":
            assert lrs == [] and job.lr is None and "+nnunet=2d" in job.overrides
        elif job.arm == "fixed":
            assert lrs == ["task.optimizer.lr=0.01"]  # its own, from its overrides
        else:
            assert lrs == [f"task.optimizer.lr={chosen[job.arm]}"]


def test_compute_matched_jobs_get_their_own_steps():
    settings = _settings(match="compute", budget_flops=1.0e12)
    steps = {"pretrained": 100, "scratch": 100, "unet": 900, "nnunet_2d": 4, "fixed": 900}
    jobs = final_jobs(settings, dict.fromkeys(steps, 1e-3), [], steps)
    for job in jobs:
        assert [o for o in job.overrides if o.startswith("trainer.max_steps=")] == [
            f"trainer.max_steps={steps[job.arm]}"
        ]
    searched = search_jobs(settings, [], steps)
    assert {job.arm: job.overrides[-2] for job in searched}["unet"] == "+trainer.val_check_interval=900"


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="nnunet_2d is an nnU-Net arm"):
        parse_arms({}, {"nnunet_2d": {"overrides": ["+nnunet=2d"], "search": True}})
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_arms({}, {"b": {"overides": ["model=unet_2d"]}})
    with pytest.raises(ConfigError, match="benchmark.match"):
        _settings(match="flops")
    with pytest.raises(ConfigError, match="budget_flops"):
        _settings(budget_flops=-1)
    with pytest.raises(ConfigError, match="alpha"):
        _settings(statistics={"alpha": 1.5})
    assert not BenchmarkSettings.from_config(
        "x",
        {
            "baselines": {"n": ["+nnunet=2d"]},
            "label_fractions": [1.0],
            "seeds": [0],
            "lr_search": {"values": [1e-4, 1e-3]},
            "metrics": ["dice"],
        },
    ).searched  # nothing to search: no search runs at all
