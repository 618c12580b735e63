"""``medseg predict`` from the command line with a trained run: outputs, exit codes, the failure summary."""

from __future__ import annotations

import logging
import shutil

import nibabel as nib
import numpy as np

from medseg.cli import main


def test_folder_with_a_nan_case_writes_the_others_and_lists_the_failure(dense_run, phantom_scan, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(phantom_scan["path"], inputs / "good.nii.gz")
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), inputs / "nan_case.nii.gz")
    code = main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(dense_run), "--device", "cpu", "--tta"])
    captured = capsys.readouterr()
    assert code == 1
    assert "1 case(s) written" in captured.out
    assert "1 case(s) failed" in captured.err and "nan_case: " in captured.err and "NaN" in captured.err
    assert "Traceback" not in captured.err
    assert [p.name for p in out.iterdir()] == ["good.nii.gz"]
    written, source = nib.load(out / "good.nii.gz"), nib.load(phantom_scan["path"])
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)


def test_single_good_case_exits_zero(dense_run, phantom_scan, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["predict", "-i", str(phantom_scan["path"]), "-o", str(out), "-m", str(dense_run), "--no-progress",
                 "--save-probabilities"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["oblique_ct.nii.gz", "oblique_ct.npz"]


def test_prompts_for_a_dense_model_are_refused_before_any_case(dense_run, phantom_scan, tmp_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text('{"space": "voxel", "objects": [{"label": 1, "points": [[1, 1, 1]], "point_labels": [1]}]}')
    args = ["predict", "-i", str(phantom_scan["path"]), "-o", str(tmp_path / "out"), "-m", str(dense_run)]
    code = main([*args, "--prompts", str(prompts)])
    err = capsys.readouterr().err
    assert code == 2 and "prompt-free" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_precision_and_batch_size_flags(dense_run, phantom_scan, tmp_path, capsys):
    """fp16 on CPU and a zero batch are refused in one line before any case; bf16 writes what fp32 writes, or
    nearly (an untrained tiny model, so the labels are compared, not scored)."""
    args = ["predict", "-i", str(phantom_scan["path"]), "-m", str(dense_run), "--device", "cpu", "--no-progress"]
    for bad, text in ((["--precision", "fp16"], "fp16 needs a CUDA device"), (["--batch-size", "0"], "at least 1")):
        code = main([*args, "-o", str(tmp_path / "bad"), *bad])
        err = capsys.readouterr().err
        assert code == 2 and text in err and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").iterdir())
    labels = {}
    for precision in ("fp32", "bf16"):
        assert main([*args, "-o", str(tmp_path / precision), "--precision", precision]) == 0
        labels[precision] = np.asarray(nib.load(tmp_path / precision / "oblique_ct.nii.gz").dataobj)
    assert (labels["bf16"] == labels["fp32"]).mean() > 0.95


def test_an_all_zero_or_constant_mri_is_refused_before_its_inference(
    mri_run, phantom_scan, tmp_path, monkeypatch, capsys
):
    """MRI normalisation divides by the foreground's spread: it used to fail after the inference as "unexpected
    RuntimeError: applying transform ForegroundZScored"; now each such case is one line naming its file."""
    import medseg.inference.predictor as predictor

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(phantom_scan["path"], inputs / "good.nii.gz")
    for name, value in (("zero", 0.0), ("flat", 7.0)):
        nib.save(nib.Nifti1Image(np.full((16, 16, 6), value, np.float32), np.eye(4)), inputs / f"{name}.nii.gz")
    inferred = []
    real = predictor.predict_dense  # patched where predict calls it, whatever was imported before
    monkeypatch.setattr(
        predictor, "predict_dense", lambda loaded, image, *a, **k: inferred.append(1) or real(loaded, image, *a, **k)
    )
    code = main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(mri_run), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and len(inferred) == 1  # only the good case reached the model
    mri = "the run's MRI normalisation (ForegroundZScored) divides by the intensity spread"
    assert f"zero: {inputs / 'zero.nii.gz'} is all zero: {mri}" in err
    assert f"flat: {inputs / 'flat.nii.gz'} holds one value (7) in every voxel above 0: {mri}" in err
    assert "unexpected" not in err and sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]


def test_predict_prints_no_third_party_noise_but_debug_does(dense_run, phantom_scan, tmp_path, caplog):
    """nvImageCodec's notices and other libraries' FutureWarnings used to open every command's output."""
    import warnings

    args = ["predict", "-i", str(phantom_scan["path"]), "-m", str(dense_run), "--device", "cpu", "--no-progress"]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")  # show everything, as a fresh interpreter shows FutureWarnings
        assert main([*args, "-o", str(tmp_path / "quiet")]) == 0
    shown = [f"{w.category.__name__}: {w.message}" for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [line for line in shown if "nvImageCodec" in line or "FutureWarning" in line], shown
    assert not any(r.name.startswith("alembic") and r.levelno < logging.WARNING for r in caplog.records)

    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        assert main(["--debug", *args, "-o", str(tmp_path / "debug")]) == 0
    assert any("nvImageCodec" in r.getMessage() for r in caplog.records)  # --debug hides nothing


def _two_series_folder(tmp_path):
    """A DICOM folder holding a 'ct' and a 'lung' series of one shape (a PACS export), and the lung series' UID."""
    import pydicom

    from medseg.data.dicom import write_dicom_series

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    volumes = {d: np.random.default_rng(k).integers(0, 400, (16, 16, 6)).astype(np.int16) for k, d in enumerate("ab")}
    folder = write_dicom_series(volumes["a"], affine, tmp_path / "export", series_description="ct")
    lung = write_dicom_series(volumes["b"], affine, tmp_path / "lung", series_description="lung")
    for path in lung.iterdir():
        shutil.copy(path, folder / f"lung_{path.name}")
    return folder, pydicom.dcmread(str(lung / "slice_0000.dcm")).SeriesInstanceUID


def test_series_picks_one_series_of_a_mixed_dicom_folder(dense_run, tmp_path, capsys):
    folder, uid = _two_series_folder(tmp_path)
    args = ["predict", "-i", str(folder), "-m", str(dense_run), "--device", "cpu", "--no-progress", "--output-format",
            "nifti"]  # fmt: skip
    assert main([*args, "-o", str(tmp_path / "mixed")]) == 1  # refused, listing the series, and nothing written
    err = capsys.readouterr().err
    assert "2 DICOM series" in err and uid in err and "'lung'" in err and "Traceback" not in err
    assert not (tmp_path / "mixed").exists() or not list((tmp_path / "mixed").iterdir())
    assert main([*args, "-o", str(tmp_path / "picked"), "--series", uid]) == 0, capsys.readouterr().err
    written = nib.load(tmp_path / "picked" / "export.nii.gz")
    assert written.shape == (16, 16, 6)
    assert main(["predict", "-i", str(tmp_path / "picked"), "-o", str(tmp_path / "x"), "-m", str(dense_run),
                 "--series", uid]) == 2  # fmt: skip
    assert "holds no DICOM folder" in capsys.readouterr().err


def test_a_bad_header_fails_its_case_before_any_inference(
    dense_run, phantom_scan, tmp_path, capsys, monkeypatch, nifti_header_editor
):
    """A NaN affine is found from the header first: the good case is the only one the model ever sees."""
    import medseg.inference.predictor as predictor

    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(phantom_scan["path"], inputs / "good.nii.gz")
    shutil.copy(phantom_scan["path"], inputs / "a_nan_affine.nii.gz")
    nifti_header_editor(inputs / "a_nan_affine.nii.gz", srow_x={0: float("nan")})
    seen = []
    original = predictor.read_case

    def spy(files, **kw):  # predict passes a case's input files (one here)
        seen.extend(f.name for f in files)
        return original(files, **kw)

    monkeypatch.setattr(predictor, "read_case", spy)
    code = main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(dense_run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "a_nan_affine: " in err and "a_nan_affine.nii.gz" in err and "Traceback" not in err
    assert seen == ["good.nii.gz"]
