"""Run folders: no command that would lose or mix up the run a folder holds (finished runs, other configs)."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from medseg.errors import ConfigError
from medseg.evaluation.nnunet_metrics import nnunet_case
from medseg.evaluation.summary import build_summary, write_summary
from medseg.runs import write_state
from medseg.workflows.run_folder import check_run_folder, is_finished


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
    run_dir = _run_folder(tmp_path, None, RUN)  # no train_state.json
    assert not is_finished(run_dir)
    check_run_folder(run_dir, _with())  # killed before its summary: resumes
    labels, mask = {"background": 0, "liver": 1}, np.ones((2, 2, 2), dtype=np.uint8)
    case = {"case_id": "a", "metrics": {"liver": {"dice": 0.9, "hd95": 1.0, "nsd": 0.9, "n_ref": 5, "n_pred": 5}}}
    case["nnunet"] = nnunet_case(mask, mask, labels, "a.nii.gz", "a.nii.gz")
    write_summary(run_dir / "summary.json", build_summary([case], labels))
    assert is_finished(run_dir)
    with pytest.raises(ConfigError, match="finished run"):
        check_run_folder(run_dir, _with())
