"""The training-throughput benchmark (``tools/bench_train.py``, :mod:`medseg.benchmark.throughput`), a few steps each
on tiny synthetic phantoms: the JSON's structure and positive rates, never timings, and its refusals."""

from __future__ import annotations

import importlib.util
import json
import weakref
from pathlib import Path

import pytest
import torch

from medseg.benchmark import throughput
from medseg.benchmark.throughput import NullPromptable, measure_configuration

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_train.py"
# promptable_synthetic made lighter still: 1 volume x 2 slices per step, two decoding rounds
SMALL_PROMPTABLE = ["data.batch_size=1", "data.sampling.num_samples=2", "task.num_iterations=2"]


@pytest.fixture(scope="module")
def bench_train():
    """``tools/bench_train.py`` loaded as a module (tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_train", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rates(record: dict, modes=("loop", "model", "data")) -> None:
    for mode in modes:
        assert record[mode]["steps"] >= 1, mode
        assert record[mode]["seconds"] > 0, mode
        assert record[mode]["steps_per_s"] > 0, mode
        assert record[mode]["cpu_ms_per_step"] > 0, mode
    if "data" in modes:  # the data mode's wall time, split into its two parts
        parts = record["data"]["parts_ms_per_step"]
        assert set(parts) == {"data", "prompts"} and parts["data"] > 0
        assert (parts["prompts"] > 0) == record["data"]["prompt_path"]
        # the parts lie inside the step's wall time; "seconds" is rounded to 0.1 ms, and two timers' reads differ by µs
    assert sum(parts.values()) <= record["data"]["seconds"] / record["data"]["steps"] * 1e3 * 1.01 + 0.1


def test_tool_writes_every_mode_of_the_unet(bench_train, bench_env, tmp_path, capsys, one_thread):
    output = tmp_path / "out" / "throughput.json"
    argv = ["--configs", "synthetic_unet", "--steps", "3", "--warmup", "1", "--output", str(output), "--table"]
    assert bench_train.main(argv) == 0
    result = json.loads(output.read_text())
    assert result["device"] == "cpu" and result["steps"] == 3 and result["warmup"] == 1
    assert result["command"].endswith(" ".join(argv))
    assert {"cpu", "cpu_count", "torch", "torch_threads"} <= set(result["machine"])
    (record,) = result["configurations"]
    assert record["name"] == "synthetic_unet" and record["task"] == "SegmentationTask"
    assert record["overrides"][0] == "experiment=synthetic_unet"
    assert record["precision"] == "32-true"
    _rates(record)
    assert record["loop_over_model"] > 0
    assert record["data"]["prompt_path"] is False  # the dense task has no prompts to simulate
    assert record["model"]["batch_shapes"]["image"] == [8, 1, 64, 64]  # 2 volumes x 4 slices of 64 px
    assert 0 < record["model"]["parameters"]["trainable"] < 20_000  # the 12.7 k-parameter UNet
    assert len(record["load_before"]) == 3 and len(record["load_after"]) == 3
    printed = capsys.readouterr().out
    assert "| `synthetic_unet` | SegmentationTask | 8 x 1 x 64 x 64 |" in printed
    parts = record["data"]["parts_ms_per_step"]
    assert f"| {parts['data']:.1f} + 0.0 |" in printed  # (c) split: data + prompts (none for the dense task)


def test_promptable_modes_run_the_click_rounds(bench_env, one_thread):
    overrides = ["experiment=promptable_synthetic", *SMALL_PROMPTABLE]
    record = measure_configuration("tiny", overrides, torch.device("cpu"), steps=2, warmup=1)
    assert record["task"] == "PromptableTask"
    _rates(record)
    assert record["data"]["prompt_path"] is True
    assert "click-simulation" in record["model"]["note"]
    assert "clicks_on_device" in record  # the task's setting (null where the task has none)
    assert record["model"]["batch_shapes"]["image"] == [2, 1, 64, 64]


def test_data_mode_of_the_3d_task_sizes_its_null_model_from_the_patches(bench_env, one_thread):
    overrides = ["experiment=promptable_synthetic_3d", "data.batch_size=1", "task.num_iterations=2"]
    record = measure_configuration("tiny3d", overrides, torch.device("cpu"), steps=2, warmup=1, modes=["data"])
    _rates(record, ["data"])
    assert record["data"]["prompt_path"] is True
    assert "loop" not in record and "loop_over_model" not in record


def test_each_mode_frees_the_previous_modes_model(bench_env, monkeypatch, one_thread):
    """A promptable LiteMedSAM step holds gigabytes: the loop's trainer (kept by the shared datamodule) used to keep
    its task alive while the model-only mode built a second one, and the benchmark was killed for memory."""
    built, alive_when_model_starts = [], []
    build = throughput._build_task

    def spy(*args, **kwargs):
        task = build(*args, **kwargs)
        built.append(weakref.ref(task))
        return task

    def model_mode(*args, **kwargs):
        alive_when_model_starts.extend(ref() is not None for ref in built)
        return {"steps": 1, "seconds": 1.0, "steps_per_s": 1.0, "cpu_ms_per_step": 1.0}

    monkeypatch.setattr(throughput, "_build_task", spy)
    monkeypatch.setattr(throughput, "measure_model", model_mode)
    overrides = ["experiment=synthetic_unet", "model.channels=[8,16,32]", "model.strides=[2,2]"]
    record = measure_configuration("unet", overrides, torch.device("cpu"), steps=2, warmup=1, modes=["loop", "model"])
    assert record["loop"]["steps_per_s"] > 0
    assert alive_when_model_starts == [False]


def test_null_model_echoes_the_previous_mask():
    model = NullPromptable((8, 8, 4))
    assert model.spatial_dims == 3 and model.roi_size == (8, 8, 4)
    embeddings = model.encode(torch.rand(2, 1, 8, 8, 4))

    class Prompts:
        prev_mask = None

    first, iou = model.decode(embeddings, Prompts(), multimask=True)
    assert first.shape == (2, 3, 8, 8, 4) and not first.any() and iou.shape == (2, 3)
    Prompts.prev_mask = torch.randn(2, 1, 8, 8, 4)
    again, _ = model.decode(embeddings, Prompts())
    assert torch.equal(again, Prompts.prev_mask)


def test_missing_dataset_is_one_line_and_writes_nothing(bench_train, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDSEG_DATA", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    output = tmp_path / "throughput.json"
    assert bench_train.main(["--configs", "quickstart", "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench_train.py: error: ") and "\n" not in err
    assert "medseg prepare mni-tissue" in err
    assert not output.exists() and list(tmp_path.iterdir()) == [tmp_path / "empty"]


def test_bad_override_is_refused_before_measuring(bench_train, bench_env, tmp_path, capsys):
    output = tmp_path / "throughput.json"
    argv = ["--configs", "synthetic_unet", "--override", "data.no_such_key=1", "--output", str(output)]
    assert bench_train.main(argv) == 2
    err = capsys.readouterr().err
    assert "data.no_such_key" in err and "Traceback" not in err
    assert not output.exists()


def test_cuda_without_a_gpu_is_refused(bench_train, bench_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    output = tmp_path / "throughput.json"
    assert bench_train.main(["--device", "cuda", "--output", str(output)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not output.exists()


def test_output_that_is_a_folder_is_refused(bench_train, bench_env, tmp_path, capsys):
    assert bench_train.main(["--configs", "synthetic_unet", "--output", str(tmp_path)]) == 2
    assert f"--output {tmp_path} is a folder" in capsys.readouterr().err


def test_a_failed_configuration_keeps_the_others(bench_train, bench_env, tmp_path, capsys, monkeypatch):
    def measure(name, overrides, device, steps, warmup, **settings):
        if name == "promptable_synthetic":
            raise RuntimeError("decode broke")
        return {"name": name, "overrides": overrides, "task": "SegmentationTask", "precision": "32-true",
                "num_workers": 0, "loop": {"steps_per_s": 2.0}}  # fmt: skip

    monkeypatch.setattr(bench_train, "measure_configuration", measure)
    output = tmp_path / "throughput.json"
    argv = ["--configs", "synthetic_unet", "promptable_synthetic", "--output", str(output), "--table"]
    assert bench_train.main(argv) == 1
    unet, failed = json.loads(output.read_text())["configurations"]
    assert unet["loop"]["steps_per_s"] == 2.0
    assert failed == {"name": "promptable_synthetic", "overrides": ["experiment=promptable_synthetic"],
                      "error": "RuntimeError: decode broke"}  # fmt: skip
    captured = capsys.readouterr()
    assert "promptable_synthetic failed" in captured.err and "decode broke" in captured.err
    assert "| `promptable_synthetic` | failed: RuntimeError: decode broke |" in captured.out
