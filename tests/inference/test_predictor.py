"""``medseg predict`` with a trained dense run: each input kind round-trips onto its exact grid; failures are clean."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.data.dicom import write_dicom_series
from medseg.data.io import load_image
from medseg.errors import ConfigError, InputShapeError, ReaderError
from medseg.inference.cases import read_case
from medseg.inference.dense import mirror_axes, predict_dense
from medseg.inference.predictor import PredictOptions, predict_case, predict_cases, predict_image
from medseg.workflows.models import load_model


@pytest.fixture(scope="module")
def dense(dense_run):
    return load_model(dense_run, device="cpu")


def assert_same_geometry(written: nib.Nifti1Image, source: nib.Nifti1Image) -> None:
    assert written.shape == source.shape[:3]
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, source.affine)
    np.testing.assert_array_equal(written.get_qform(), source.get_qform())
    np.testing.assert_array_equal(written.get_sform(), source.get_sform())
    assert int(written.header["qform_code"]) == int(source.header["qform_code"])
    assert int(written.header["sform_code"]) == int(source.header["sform_code"])


def test_run_folder_loads_as_a_dense_model(dense, dense_run):
    assert dense.kind == "dense"
    assert dense.label_names == {0: "background", 1: "liver", 2: "kidney", 3: "spleen", 4: "bone"}
    assert str(dense_run) in dense.source and len(dense.weights_id) == 64
    targets = [t["_target_"].rsplit(".", 1)[-1] for t in dense.config.data.preprocess]
    assert targets[:2] == ["Orientationd", "Spacingd"] and "CTWindowd" in targets


def test_nifti_file_round_trip_oblique_lps(dense, phantom_scan, tmp_path):
    source = nib.load(phantom_scan["path"])
    assert int(source.header["qform_code"]) != int(source.header["sform_code"])  # both forms must survive
    assert nib.aff2axcodes(source.affine)[:2] == ("L", "P") and not np.allclose(source.affine[:3, :3], np.diag(
        np.diag(source.affine[:3, :3])))  # fmt: skip
    written = predict_case(dense, phantom_scan["path"], tmp_path, options=PredictOptions(save_probabilities=True))
    assert [p.name for p in written] == ["oblique_ct.npz", "oblique_ct.nii.gz"]
    output = nib.load(tmp_path / "oblique_ct.nii.gz")
    assert_same_geometry(output, source)
    labels = np.asarray(output.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    saved = np.load(tmp_path / "oblique_ct.npz")
    assert saved["probabilities"].shape == (5, *source.shape) and saved["probabilities"].dtype == np.float32
    np.testing.assert_allclose(saved["probabilities"].sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(saved["probabilities"].argmax(0), labels)
    np.testing.assert_array_equal(saved["labels"], [0, 1, 2, 3, 4])
    np.testing.assert_allclose(saved["affine"], source.affine, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oblique_ct.nii.gz", "oblique_ct.npz"]  # no temporaries


def test_prediction_is_the_evaluation_path(dense, phantom_scan):
    """Same labels as the code ``medseg evaluate`` runs: predict_logits on the preprocessed image, then
    native_label_map through the same transforms."""
    from medseg.inference import native_label_map, predict_logits
    from medseg.inference.dense import preprocessing_of

    image = load_image(phantom_scan["path"])
    transform = preprocessing_of(dense)
    item = transform({"image": image})
    logits = predict_logits(dense.model, item["image"], spatial_dims=2, **dict(dense.config.task.inference))
    expected = native_label_map(logits, item, transform).numpy()
    np.testing.assert_array_equal(predict_dense(dense, load_image(phantom_scan["path"])).labels, expected)


def test_tta_mirrors_in_plane_for_2d_and_changes_the_result(dense, phantom_scan):
    assert mirror_axes(2, 2) == [(), (0,), (1,), (0, 1)]
    assert len(mirror_axes(3, None)) == 8 and mirror_axes(3, None)[-1] == (0, 1, 2)
    image = load_image(phantom_scan["path"])
    plain = predict_dense(dense, image).probabilities
    mirrored = predict_dense(dense, load_image(phantom_scan["path"]), tta=True).probabilities
    assert plain.shape == mirrored.shape
    assert not np.allclose(plain, mirrored, atol=1e-4), "TTA averaged nothing"


def test_folder_run_with_one_truncated_case_writes_the_others(dense, phantom_scan, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(phantom_scan["path"], inputs / "a.nii.gz")
    shutil.copy(phantom_scan["path"], inputs / "c.nii.gz")
    data = (inputs / "a.nii.gz").read_bytes()
    (inputs / "b_truncated.nii.gz").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    report = predict_cases(dense, inputs, out)
    assert sorted(report.written) == ["a", "c"]
    assert list(report.failed) == ["b_truncated"]
    assert "b_truncated.nii.gz" in report.failed["b_truncated"] and "truncated" in report.failed["b_truncated"]
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "c.nii.gz"]
    first, second = (np.asarray(nib.load(out / n).dataobj) for n in ("a.nii.gz", "c.nii.gz"))
    np.testing.assert_array_equal(first, second)


def test_dicom_series_round_trip(dense, phantom_scan, tmp_path):
    series = write_dicom_series(phantom_scan["image"], phantom_scan["affine"], tmp_path / "series_01")
    report = predict_cases(dense, series, tmp_path / "out", options=PredictOptions(output_format="both"))
    assert report.ok and list(report.written) == ["series_01"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["series_01.dcm", "series_01.nii.gz"]
    output = nib.load(tmp_path / "out" / "series_01.nii.gz")
    image = load_image(series)
    assert output.shape == tuple(image.shape[1:])
    np.testing.assert_allclose(output.affine, np.asarray(image.affine), atol=1e-5)
    np.testing.assert_allclose(output.affine, phantom_scan["affine"], atol=1e-3)  # MONAI's RAS affine of the series
    assert int(output.header["qform_code"]) == 1 and int(output.header["sform_code"]) == 1
    # The same scan as NIfTI gives the same probabilities, up to MONAI's Spacing, whose output origin moves by ~0.5 mm
    # when the affines differ by ~1e-7 (float32 NIfTI header vs DICOM decimal strings). The tiny model is barely
    # trained (near-uniform probabilities), so its argmax is too unstable to compare voxel for voxel.
    from_nifti = predict_dense(dense, load_image(phantom_scan["path"]))
    from_dicom = predict_dense(dense, image)
    np.testing.assert_array_equal(from_dicom.labels, np.asarray(output.dataobj))
    difference = np.abs(from_nifti.probabilities - from_dicom.probabilities)
    print(f"DICOM vs NIfTI probabilities: mean |diff| {difference.mean():.4f}, max {difference.max():.3f}")
    assert difference.mean() < 0.03


def write(tmp_path, name, array):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def test_bad_inputs_fail_with_their_message_and_leave_no_file(dense, tmp_path):
    out = tmp_path / "out"
    nan = write(tmp_path, "nan.nii.gz", np.full((8, 8, 4), np.nan, np.float32))
    partial = np.zeros((8, 8, 4), np.float32)
    partial[1, 2, 3] = np.inf
    cases = {
        nan: (ReaderError, "only NaN or infinite values"),
        write(tmp_path, "inf.nii.gz", partial): (ReaderError, "1 NaN or infinite voxel"),
        write(tmp_path, "four_d.nii.gz", np.zeros((8, 8, 4, 3), np.float32)): (InputShapeError, "3 channel"),
        write(tmp_path, "five_d.nii.gz", np.zeros((8, 8, 4, 1, 2), np.float32)): (InputShapeError, "channel"),
        write(tmp_path, "empty.nii.gz", np.zeros((8, 0, 4), np.float32)): (ReaderError, "empty"),
        write(tmp_path, "flat.nii.gz", np.zeros((8, 8), np.float32)): (InputShapeError, "spatial dimensions"),
    }
    for path, (error, text) in cases.items():
        with pytest.raises(error, match=text) as caught:
            predict_case(dense, path, out)
        assert path.name in str(caught.value), str(caught.value)
    assert not out.exists() or not list(out.iterdir())


def test_flags_that_do_not_fit_the_model_are_refused(dense, phantom_scan, tmp_path, monkeypatch):
    image = read_case(phantom_scan["path"])
    from medseg.prompts.files import parse_prompts

    objects = parse_prompts({"space": "voxel", "objects": [{"label": 1, "points": [[1, 1, 1]], "point_labels": [1]}]},
                            np.eye(4), (36, 30, 10))  # fmt: skip
    with pytest.raises(ConfigError, match="prompt-free"):
        predict_image(dense, image, objects)
    with pytest.raises(ConfigError, match="slice-axis"):
        predict_image(dense, image, options=PredictOptions(slice_axis=3))
    with pytest.raises(ConfigError, match="neither a run folder"):
        load_model(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        load_model("litemedsam", device="cuda")
    with pytest.raises(ConfigError, match="cpu or cuda"):
        load_model(dense_run_folder(dense), device="mps")


def dense_run_folder(loaded):
    return loaded.source.split(" ")[1]


def test_labels_a_label_map_cannot_hold_are_refused_before_any_case(dense, phantom_scan, tmp_path):
    import dataclasses

    wide = dataclasses.replace(dense, label_names={**dense.label_names, 70000: "lesion"})
    with pytest.raises(ConfigError, match="label value 70000, above 65535, the largest a uint16 label map holds"):
        predict_cases(wide, phantom_scan["path"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_litemedsam_refuses_an_image_without_contrast_unless_windowed(litemedsam_model, tmp_path):
    """Its MR recipe takes percentiles of the voxels > 0; an all-zero volume has none (a CT needs --window)."""
    path = write(tmp_path, "zero.nii.gz", np.zeros((16, 16, 2), np.float32))
    prompts = tmp_path / "p.json"
    prompts.write_text('{"space": "voxel", "objects": [{"label": 1, "boxes": [[2, 2, 1, 9, 9, 1]]}]}')
    with pytest.raises(ReaderError, match=r"zero\.nii\.gz is all zero: LiteMedSAM's MR recipe .* A CT needs --window"):
        predict_case(litemedsam_model, path, tmp_path / "out", prompts)
    assert not (tmp_path / "out").exists()


def test_failures_outside_medseg_are_told_in_words_where_they_are_known():
    from medseg.inference.report import failure_message

    assert failure_message(MemoryError()).startswith("out of memory for this case; free memory")
    assert failure_message(torch.OutOfMemoryError("CUDA out of memory")).startswith("the GPU ran out of memory")
    disk = OSError(28, "No space left on device", "/data/out/case.nii.gz")
    assert failure_message(disk).startswith("/data/out/case.nii.gz: No space left on device")
    assert failure_message(KeyError("x")).startswith("unexpected KeyError: 'x'")  # the rest stays marked unexpected


def test_compile_reaches_the_click_path_and_changes_no_mask(tmp_path, monkeypatch):
    """``--compile`` compiles a fresh LiteMedSAM's click path (traced with aot_eager here: no code generation on a test
    CPU) and writes the label map of the eager run."""
    from medseg.models.promptable import PromptableSegmenter

    compile_decoder = PromptableSegmenter.compile_decoder
    monkeypatch.setattr(PromptableSegmenter, "compile_decoder", lambda self: compile_decoder(self, backend="aot_eager"))
    volume = np.zeros((40, 40, 2), np.float32)
    volume[10:25, 12:30] = 200.0
    volume += np.random.default_rng(0).normal(0, 5, volume.shape).astype(np.float32)
    path = write(tmp_path, "blob.nii.gz", volume)
    prompts = tmp_path / "p.json"
    prompts.write_text('{"space": "voxel", "objects": [{"label": 1, "boxes": [[8, 10, 0, 27, 32, 1]]}]}')
    outputs = {}
    for flag in (False, True):
        loaded = load_model("litemedsam", device="cpu")
        report = predict_cases(loaded, path, tmp_path / str(flag), prompts, PredictOptions(compile=flag))
        assert not report.failed
        assert loaded.model.compiled_mode == ("aot_eager" if flag else None)
        clicks = loaded.model.click_decoder()
        assert (clicks._run != clicks._decode) is flag  # the restructured click path itself is the compiled one
        outputs[flag] = np.asarray(nib.load(tmp_path / str(flag) / "blob.nii.gz").dataobj)
    assert outputs[False].sum() > 100
    np.testing.assert_array_equal(outputs[True], outputs[False])


def test_dicom_inputs_get_a_dicom_seg_by_default_and_nifti_inputs_cannot(dense, phantom_scan, tmp_path):
    import pydicom

    series = write_dicom_series(phantom_scan["image"], phantom_scan["affine"], tmp_path / "series_01")
    assert predict_cases(dense, series, tmp_path / "seg").ok
    assert [p.name for p in (tmp_path / "seg").iterdir()] == ["series_01.dcm"]
    seg = pydicom.dcmread(tmp_path / "seg" / "series_01.dcm")
    source = pydicom.dcmread(sorted(series.iterdir())[0])
    assert seg.Modality == "SEG" and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    with pytest.raises(ConfigError, match="is not DICOM, and a DICOM SEG references its source series"):
        predict_cases(dense, phantom_scan["path"], tmp_path / "x", options=PredictOptions(output_format="seg"))
    with pytest.raises(ConfigError, match="add --output-format both"):
        predict_cases(dense, series, tmp_path / "y", options=PredictOptions(save_probabilities=True))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
