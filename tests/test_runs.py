"""Run folders: one writer at a time, and no command that would lose or mix up the run a folder holds."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from medseg.errors import ConfigError
from medseg.runs import RunLock, check_run_folder, config_differences, is_finished, write_state

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


def _run_folder(tmp_path, status: str | None, config: dict):
    """A run folder with a checkpoint, ``.hydra/config.yaml`` of ``config`` and a ``status`` state file."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    if status:
        write_state(run_dir, status)
    return run_dir


RUN = {
    "seed": 1,
    "resume": "auto",
    "data": {"preprocess": {"spacing": [1.5, 1.5, 3.0]}},
    "trainer": {"max_steps": 60},
    "model_name": "${hydra:runtime.choices.backbone}-${hydra:runtime.choices.model}",
}


def _with(**changes):
    cfg = OmegaConf.create(RUN)
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    return cfg


def test_a_finished_run_is_continued_or_started_over_only_on_request(tmp_path):
    run_dir = _run_folder(tmp_path, "finished", RUN)
    assert is_finished(run_dir)
    write_state(run_dir, "finished", evaluated=True)  # its summary.json is gone: evaluating it again is allowed
    assert not is_finished(run_dir)
    check_run_folder(run_dir, _with())
    write_state(run_dir, "finished", evaluated=False)
    with pytest.raises(ConfigError, match=r"holds a finished run: add resume=true .* overwrite=true"):
        check_run_folder(run_dir, _with())
    check_run_folder(run_dir, _with(resume=True, trainer__max_steps=120))  # more steps on the same run
    check_run_folder(run_dir, _with(overwrite=True))
    check_run_folder(run_dir, _with(fit=False))  # only evaluates


def test_an_unfinished_run_resumes_but_not_under_another_config(tmp_path):
    run_dir = _run_folder(tmp_path, "training", RUN)
    check_run_folder(run_dir, _with(trainer__max_steps=30, evaluate=False))  # what may change between commands
    with pytest.raises(ConfigError) as error:
        check_run_folder(run_dir, _with(data__preprocess__spacing=[4, 4, 8], model_name="unet2d"))
    message = str(error.value)
    assert "data.preprocess.spacing: [1.5, 1.5, 3.0] -> [4, 4, 8]" in message and "model_name" in message
    assert "overwrite=true" in message
    with pytest.raises(ConfigError, match="resume=false would start .* over"):
        check_run_folder(run_dir, _with(resume=False))


def test_run_folders_of_older_versions_count_as_finished_by_their_summary(tmp_path):
    from medseg.evaluation.summary import build_summary, write_summary

    run_dir = _run_folder(tmp_path, None, RUN)  # no train_state.json
    assert not is_finished(run_dir)
    check_run_folder(run_dir, _with())  # killed before its summary: resumes
    case = {"case_id": "a", "metrics": {"liver": {"dice": 0.9, "hd95": 1.0, "nsd": 0.9, "n_ref": 5, "n_pred": 5}}}
    write_summary(run_dir / "summary.json", build_summary([case], {"background": 0, "liver": 1}))
    assert is_finished(run_dir)
    with pytest.raises(ConfigError, match="finished run"):
        check_run_folder(run_dir, _with())


def test_config_differences_ignore_what_a_resume_may_change():
    assert config_differences(_with(), _with(trainer__max_steps=5, callbacks__rich_progress_bar=None)) == []
    assert config_differences(_with(), _with(seed=2)) == ["seed: 1 -> 2"]
