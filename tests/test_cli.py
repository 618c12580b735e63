"""The command line as a user meets it: exit codes, one-line errors, every problem listed."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.data.prepare import synthetic


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    synthetic.build(root, seed=1, num_train=4, num_test=1, shape=(32, 32, 12))
    return root


def test_prepare_builds_checks_and_summarises(tmp_path, capsys):
    code = main(["prepare", "synthetic", "--check", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "Dataset990_Synthetic" / "dataset.json").is_file()
    assert "valid" in out and "liver" in out and "median spacing" in out


def test_broken_dataset_lists_every_problem_without_a_traceback(built, tmp_path, capsys):
    import shutil

    broken = tmp_path / "Dataset990_Synthetic"
    shutil.copytree(built / "Dataset990_Synthetic", broken)
    (broken / "labelsTr" / "phantom_000.nii.gz").unlink()  # a missing label
    label = nib.load(str(broken / "labelsTr" / "phantom_001.nii.gz"))
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 9  # an undeclared label value
    nib.save(nib.Nifti1Image(data, label.affine), str(broken / "labelsTr" / "phantom_001.nii.gz"))
    image = nib.load(str(broken / "imagesTr" / "phantom_002_0000.nii.gz"))
    values = np.asarray(image.dataobj).astype(np.float32)
    values[1, 1, 1] = np.nan  # a NaN voxel
    nib.save(nib.Nifti1Image(values, image.affine), str(broken / "imagesTr" / "phantom_002_0000.nii.gz"))

    code = main(["validate", str(broken)])
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())  # rich wraps long lines
    assert code == 1
    assert "3 problem(s)" in text
    assert "phantom_000" in text and "phantom_001.nii.gz" in text and "phantom_002_0000.nii.gz" in text
    assert "Traceback" not in text


def test_unknown_dataset_is_one_line_and_exit_2(built, capsys, monkeypatch):
    monkeypatch.setenv("MEDSEG_DATA", str(built))
    code = main(["validate", "Dataset555_Nope"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("medseg validate: error: Dataset 'Dataset555_Nope' not found")
    assert "MEDSEG_DATA" in err and "Dataset990_Synthetic" in err


def test_console_script_is_installed_and_quiet_on_errors(tmp_path):
    env = {**os.environ, "MEDSEG_DATA": str(tmp_path / "absent")}
    result = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "validate", "mni-tissue"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert "MEDSEG_DATA" in result.stderr and "Traceback" not in result.stderr


def test_convert_msd_then_refuse_then_force(tmp_path, capsys):
    import json

    source = tmp_path / "Task09_Spleen"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (source / folder).mkdir(parents=True)
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    for case in ("spleen_1", "spleen_2"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), affine), str(source / "imagesTr" / f"{case}.nii.gz"))
        label = np.zeros((8, 8, 4), np.uint8)
        label[2:5, 2:5, 1:3] = 1
        nib.save(nib.Nifti1Image(label, affine), str(source / "labelsTr" / f"{case}.nii.gz"))
    cases = ("spleen_1", "spleen_2")
    description = {
        "name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"}, "numTraining": 2,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        "test": [],
    }  # fmt: skip
    (source / "dataset.json").write_text(json.dumps(description))
    out = tmp_path / "data"
    assert main(["convert", "msd", str(source), "--id", "9", "--output", str(out)]) == 0
    converted = out / "Dataset009_Spleen"
    assert (converted / "imagesTr" / "spleen_1_0000.nii.gz").is_file()
    assert json.loads((converted / "dataset.json").read_text())["labels"] == {"background": 0, "spleen": 1}
    assert main(["validate", str(converted)]) == 0

    assert main(["convert", "msd", str(source), "--id", "9", "--output", str(out)]) == 2
    assert "Dataset009_Spleen" in capsys.readouterr().err
    assert main(["convert", "msd", str(source), "--id", "9", "--output", str(out), "--force"]) == 0


def test_predict_rejects_a_missing_input_and_a_bad_window_before_loading_a_model(tmp_path, capsys):
    code = main(["predict", "-i", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "out"), "-m", "litemedsam"])
    err = capsys.readouterr().err
    assert code == 2 and "nope.nii.gz does not exist" in err and "Traceback" not in err
    image = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), image)
    args = [
        "predict",
        "-i",
        str(image),
        "-o",
        str(tmp_path / "out"),
        "-m",
        "no_such_model_folder",
        "--window",
        "4O:400",
    ]
    assert main(args) == 2
    assert "--window '4O:400'" in capsys.readouterr().err
    with pytest.raises(Exception, match="does not exist"):  # --debug shows the real exception
        main(["predict", "--debug", "-i", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "o"), "-m", "x"])
    assert not (tmp_path / "out").exists()


def test_predict_compile_flag_reaches_the_options(tmp_path, monkeypatch, capsys):
    import medseg.inference.predictor as predictor
    import medseg.workflows.models as models
    from medseg.inference.report import PredictReport

    seen = {}

    def predict_cases(loaded, *args, options, **kwargs):
        seen["options"] = options
        return PredictReport()

    monkeypatch.setattr(models, "load_model", lambda *a, **k: SimpleNamespace(source="stub"))
    monkeypatch.setattr(predictor, "predict_cases", predict_cases)
    image = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), image)
    base = ["predict", "-i", str(image), "-o", str(tmp_path / "out"), "-m", "litemedsam"]
    assert main(base) == 0 and seen["options"].compile is False
    assert main([*base, "--compile"]) == 0 and seen["options"].compile is True


def test_release_and_benchmark_verbs_fail_clearly_without_a_traceback(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing")]) == 1
    assert "sha256sums.txt not found" in capsys.readouterr().out
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "release")]) == 2
    err = capsys.readouterr().err
    assert "must be a run folder written by `medseg train`" in err and "Traceback" not in err
    assert not (tmp_path / "release").exists()
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "-o", str(tmp_path / "release"), "--merge", "--adapter-only"])
    assert "not allowed with argument --merge" in capsys.readouterr().err
    assert main(["benchmark", "experiment=no_such_benchmark"]) == 2
    assert "Could not find 'experiment/no_such_benchmark'" in capsys.readouterr().err


# --- medseg train: refused commands leave no trace, a run folder has one writer --------------------------------------

TRAIN_TINY = [
    "experiment=synthetic_unet", "model.channels=[8,16,32]", "model.strides=[2,2]", "model.num_res_units=1",
    "data.sampling.size=32", "data.batch_size=2", "logger=csv", "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null", "evaluate=false", "trainer.check_val_every_n_epoch=1",
]  # fmt: skip


@pytest.fixture
def hydra_logging():
    """`medseg train` runs Hydra in this process, which configures logging: put the root logger back afterwards."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_train_refuses_bad_values_and_unusable_results_folders_before_creating_anything(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    monkeypatch.setenv("MEDSEG_RESULTS", str(results))
    assert main(["train", *TRAIN_TINY, "trainer.max_steps=-5"]) == 2
    err = capsys.readouterr().err
    assert "trainer.max_steps=-5" in err and len(err.strip().splitlines()) == 1
    assert not results.exists()

    results.write_text("a file, not a folder")
    assert main(["train", *TRAIN_TINY]) == 2
    err = capsys.readouterr().err
    assert f"{results} is a file" in err and "set MEDSEG_RESULTS to a writable folder" in err
    assert len(err.strip().splitlines()) == 1 and results.read_text() == "a file, not a folder"


def test_a_refused_train_command_leaves_the_run_folder_as_it_was(built, tmp_path, monkeypatch, capsys, hydra_logging):
    from omegaconf import OmegaConf

    from medseg.runs import RunLock

    monkeypatch.setenv("MEDSEG_DATA", str(built))
    run = tmp_path / "run"
    command = ["train", *TRAIN_TINY, f"hydra.run.dir={run}", "trainer.max_steps=2"]
    assert main(command) == 0
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert saved.data.preprocess.spacing == [1.5, 1.5, 3.0] and (run / "checkpoints" / "last.ckpt").is_file()

    def files():
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".medseg.lock"}

    before = files()
    capsys.readouterr()
    refusals = [
        (["data.preprocess.spacing=[4,4,8]", "trainer.max_steps=-5"], "trainer.max_steps=-5 is not a number"),
        (["data.preprocess.spacing=[4,4,8]"], "another config (data.preprocess.spacing: [1.5, 1.5, 3.0] -> [4, 4, 8])"),
        ([], "holds a finished run: add resume=true"),
    ]
    for extra, expected in refusals:
        assert main([*command, *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert files() == before, extra
    with RunLock(run):  # another `medseg train` at work in the folder (here: this process, through its own lock)
        assert main([*command, "resume=true"]) == 2
    err = capsys.readouterr().err
    assert f"{run} is in use by another `medseg train` (PID {os.getpid()}" in err and len(err.strip().splitlines()) == 1
    assert files() == before

    assert main([*command, "trainer.max_steps=4", "resume=true"]) == 0  # continued on request, with more steps
    resumed = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert resumed.trainer.max_steps == 4 and resumed.resume is True
    assert OmegaConf.masked_copy(resumed, ["data", "model", "task"]) == OmegaConf.masked_copy(
        saved, ["data", "model", "task"]
    )
