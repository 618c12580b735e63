"""Run folders: one writer at a time, and what a later command of the same run may change."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from medseg.errors import ConfigError
from medseg.runs import RunLock, config_differences

HOLD_LOCK = "import sys, time; from medseg.runs import RunLock; RunLock(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(600)"  # noqa: E501


def test_a_locked_run_folder_is_refused_naming_the_holder_and_freed_when_it_dies(tmp_path):
    run_dir = tmp_path / "fold_0"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as error:
            RunLock(run_dir).__enter__()
        message = str(error.value)
        assert str(run_dir) in message and f"PID {holder.pid}" in message and "\n" not in message
    finally:
        holder.kill()  # as kill -9: no cleanup runs, the lock file stays
        holder.wait()
    with RunLock(run_dir):  # the kernel released the lock with the process: nothing stale
        pass


def test_config_differences_ignore_what_a_resume_may_change():
    saved = OmegaConf.create({"seed": 1, "resume": "auto", "trainer": {"max_steps": 60}})
    resumed = OmegaConf.merge(saved, {"trainer": {"max_steps": 5}, "callbacks": {"rich_progress_bar": None}})
    assert config_differences(saved, resumed) == []
    assert config_differences(saved, OmegaConf.merge(saved, {"seed": 2})) == ["seed: 1 -> 2"]
