"""``medseg predict`` never loses an input, fails on its paths before the model loads, and cleans up after a kill."""

from __future__ import annotations

import logging
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.inference.cases import discover_cases
from medseg.inference.preflight import OutputError, check_outputs


def predict(*args: str) -> list[str]:
    return ["predict", *args, "--device", "cpu", "--no-progress"]


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def scans(phantom_scan, tmp_path):
    """A folder of two inputs, ``a.nii.gz`` and the uncompressed ``b.nii``."""
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(phantom_scan["path"], folder / "a.nii.gz")
    source = nib.load(phantom_scan["path"])
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), source.affine, source.header), folder / "b.nii")
    return folder


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: the checks must come first."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the paths were checked")

    monkeypatch.setattr("medseg.workflows.models.load_model", load_model)


def test_output_into_the_input_folder_is_refused_and_every_input_survives(dense_run, scans, tmp_path, capsys):
    """The red-team reproduction: `medseg predict -i scans/ -o scans/ -m RUN` exited 0 with the inputs replaced."""
    before = snapshot(scans)
    for args in (["-i", str(scans), "-o", str(scans)], ["-i", str(scans / "b.nii"), "-o", str(scans)]):
        code = main(predict(*args, "-m", str(dense_run)))
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"-o {scans} is the folder of the input {scans}/" in err and "scans_predictions" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert snapshot(scans) == before

    # Through a symlink: the inputs are links to files in real/, and -o real/ would write onto their targets.
    real, links = tmp_path / "real", tmp_path / "links"
    shutil.copytree(scans, real)
    links.mkdir()
    (links / "a.nii.gz").symlink_to(real / "a.nii.gz")
    code = main(predict("-i", str(links), "-o", str(real), "-m", str(dense_run)))
    err = capsys.readouterr().err
    assert code == 2 and f"output {real}/a.nii.gz is the input {links}/a.nii.gz" in err and "Give -o" in err
    assert snapshot(real) == before


def test_output_path_problems_are_found_before_the_model_loads(no_model, scans, tmp_path, monkeypatch, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    in_the_way = tmp_path / "out_with_folder"
    (in_the_way / "a.nii.gz").mkdir(parents=True)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(readonly) else real_access(p, mode))
    cases = {
        "-o is a file": (["-o", str(afile)], f"-o {afile} must be a folder, but {afile} is a file"),
        "-o under a file": (["-o", str(afile / "sub")], f"{afile}, on the way to {afile}/sub, is a file"),
        "--cache-dir is a file": (
            ["-o", str(tmp_path / "out"), "--cache-dir", str(afile)],
            f"--cache-dir {afile} must be a folder",
        ),
        "a folder where a label map goes": (["-o", str(in_the_way)], f"output {in_the_way}/a.nii.gz is a folder"),
        "read-only -o": (["-o", str(readonly / "out")], f"cannot write into {readonly} (read-only)"),
    }
    for name, (args, message) in cases.items():
        code = main(predict("-i", str(scans), *args, "-m", "litemedsam"))
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (name, err)
    assert afile.read_text() == "mine" and not (tmp_path / "out").exists() and not list(readonly.iterdir())


def test_prompt_files_are_checked_before_the_model_loads(no_model, scans, tmp_path, capsys):
    """A label beyond uint16, NaN clicks and 100,000-deep JSON used to fail as "unexpected ..." after inference."""
    files = {
        "deep.json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        "label.json": ('{"space": "voxel", "objects": [{"label": 70000, "boxes": [[1, 1, 1, 5, 5, 1]]}]}', "65535"),
        "nan.json": (
            '{"space": "world", "objects": [{"label": 1, "points": [[NaN, 0, 0]], "point_labels": [1]}]}',
            "object 0, points[0]: [nan, 0, 0] holds NaN",
        ),
    }
    for name, (text, message) in files.items():
        (tmp_path / name).write_text(text)
        code = main(predict("-i", str(scans), "-o", str(tmp_path / "out"), "-m", "litemedsam", "--prompts",
                            str(tmp_path / name)))  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and f"{tmp_path / name}: " in err and message in err and "unexpected" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_rerun_clears_what_a_killed_run_left_and_nothing_else(dense_run, phantom_scan, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    orphans = [".oblique_ct.nii.gz.0123456789ab.tmp.nii.gz", ".oblique_ct.npz.a1b2c3d4e5f6.tmp.npz"]
    for name in orphans:
        (out / name).write_bytes(b"half a file")
    # killed between its two renames: the probabilities made it, the label map (renamed last) did not
    np.savez(out / "oblique_ct.npz", probabilities=np.zeros((2, 1, 1, 1)), labels=np.arange(2), affine=np.eye(4))
    mine = {".notes.tmp": b"mine", "other.npz": b"not medseg's", ".other.nii.gz.tmp.nii.gz": b"mine too"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="medseg.predict"):
        code = main(predict("-i", str(phantom_scan["path"]), "-o", str(out), "-m", str(dense_run)))
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*mine, "oblique_ct.nii.gz"])
    assert all((out / name).read_bytes() == data for name, data in mine.items())
    assert "removed 3 unfinished file(s) of an interrupted run" in caplog.text


def test_probabilities_and_label_map_appear_together_or_not_at_all(dense_run, phantom_scan, tmp_path, monkeypatch):
    """A full disk while the label map is written takes the probabilities back out, with a message naming the file."""
    from medseg.inference.predictor import PredictOptions, predict_cases
    from medseg.workflows.models import load_model

    real_save = nib.save

    def disk_full_for_label_maps(image, filename):
        if str(filename).endswith(".nii.gz"):
            real_save(image, filename)  # half written, then the disk is full
            raise OSError(28, "No space left on device", str(filename))
        real_save(image, filename)

    monkeypatch.setattr(nib, "save", disk_full_for_label_maps)
    out = tmp_path / "out"
    loaded = load_model(dense_run, device="cpu")
    report = predict_cases(loaded, phantom_scan["path"], out, options=PredictOptions(save_probabilities=True))
    assert report.failed == {
        "oblique_ct": f"cannot write {out}/oblique_ct.nii.gz (No space left on device). Free disk space, or give -o a "
        f"writable folder."
    }
    assert list(out.iterdir()) == []  # no probabilities without their label map, no temporaries


def test_outputs_never_land_inside_a_dicom_series_being_read(phantom_scan, tmp_path):
    from medseg.data.dicom import write_dicom_series

    series = write_dicom_series(phantom_scan["image"][:, :, :3], phantom_scan["affine"], tmp_path / "series_01")
    with pytest.raises(OutputError, match=rf"-o {series}/out lies inside the DICOM series {series}"):
        check_outputs(discover_cases(series), series / "out")
    assert check_outputs(discover_cases(series), tmp_path / "out", probabilities=True, output_format="both") == [
        tmp_path / "out" / "series_01.npz",
        tmp_path / "out" / "series_01.dcm",
        tmp_path / "out" / "series_01.nii.gz",
    ]
    assert check_outputs(discover_cases(series), tmp_path / "out") == [tmp_path / "out" / "series_01.dcm"]


def test_every_channel_file_of_an_nnunet_case_is_an_input(phantom_scan, tmp_path):
    scans, out = tmp_path / "imagesTs", tmp_path / "out"
    scans.mkdir()
    out.mkdir()
    for channel in ("0000", "0001"):
        shutil.copy(phantom_scan["path"], scans / f"liver_{channel}.nii.gz")
    os.link(scans / "liver_0001.nii.gz", out / "liver.nii.gz")  # the label map would be written over channel 1
    with pytest.raises(OutputError, match="liver_0001.nii.gz"):
        check_outputs(discover_cases(scans), out)
    assert check_outputs(discover_cases(scans), tmp_path / "elsewhere") == [tmp_path / "elsewhere" / "liver.nii.gz"]
