"""The job record: an nnU-Net run's child-process memory reaches job.json."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

import medseg.benchmark.jobs
from medseg.benchmark.jobs import nnunet_memory, read_job, train_job


def _fake_nnunet_train(result: dict):
    def train(cfg):
        folder = Path(str(cfg.run_dir)) / "nnunet"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps(result))
        return {"test/dice_fg": 0.5}

    return train


def test_an_nnunet_jobs_record_carries_its_child_processes_peak(tmp_path, monkeypatch):
    child = {"peak_rss_mb": 987654.0, "peak_gpu_memory_mb": 4321.0, "steps_trained": 4}  # larger than this process
    monkeypatch.setattr(medseg.benchmark.jobs, "train", _fake_nnunet_train(child))
    record = train_job(OmegaConf.create({"run_dir": str(tmp_path / "run")}))
    assert record["status"] == "ok" and read_job(tmp_path / "run") == record
    assert record["nnunet_peak_rss_mb"] == 987654.0 and record["peak_gpu_memory_mb"] == 4321.0
    assert record["peak_rss_mb"] in (None, 987654.0)  # the larger of the job's and the child's (None: not Linux)


def test_other_runs_have_no_child_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(medseg.benchmark.jobs, "train", lambda cfg: {"test/dice_fg": 0.5})
    record = train_job(OmegaConf.create({"run_dir": str(tmp_path / "run")}))
    assert "nnunet_peak_rss_mb" not in record and "peak_gpu_memory_mb" not in record
    assert nnunet_memory(tmp_path / "run") == {}
    (tmp_path / "run" / "nnunet").mkdir()
    (tmp_path / "run" / "nnunet" / "result.json").write_text("{not json")
    assert nnunet_memory(tmp_path / "run") == {}
