"""The command line as a user meets it: exit codes, one-line errors, every problem listed."""

from __future__ import annotations

import os
import subprocess
import sys

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
