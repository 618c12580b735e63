"""validate_dataset: each kind of problem is reported with its file, and all of them in one pass."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medseg.data.validate import Problem, geometry_difference, validate_dataset


def _only(problems, name):
    """The problems about the file called ``name``; fails unless there is exactly one problem in total."""
    assert len(problems) == 1, "\n".join(map(str, problems))
    assert problems[0].path.name == name, str(problems[0])
    return problems[0]


def _edit_json(root, **changes):
    path = root / "dataset.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _rewrite(path, data=None, affine=None):
    """Rewrite a NIfTI file with new data and/or affine, keeping what is not given."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(data, image.affine if affine is None else affine), str(path))


def test_clean_datasets_have_no_problems(make_nnunet_dataset, make_msd_dataset):
    assert validate_dataset(make_nnunet_dataset(channels=("T2", "ADC"), num_test=1, test_labels=True)) == []
    assert validate_dataset(make_msd_dataset(modalities=("T2", "ADC"))) == []
    assert validate_dataset(make_msd_dataset(name="Task02_Heart", modalities=("MRI",))) == []


def test_problem_str_names_file_message_and_fix(tmp_path):
    problem = Problem(tmp_path / "x.nii.gz", "label has no image", "delete it")
    assert str(problem) == f"{tmp_path / 'x.nii.gz'}: label has no image. Fix: delete it"


def test_missing_dataset_json(make_nnunet_dataset):
    root = make_nnunet_dataset()
    (root / "dataset.json").unlink()
    assert "missing" in _only(validate_dataset(root), "dataset.json").message


def test_dataset_json_not_json(make_nnunet_dataset):
    root = make_nnunet_dataset()
    (root / "dataset.json").write_text("{'labels': 1}")
    assert "not valid JSON" in _only(validate_dataset(root), "dataset.json").message


def test_dataset_json_missing_fields_all_listed(make_nnunet_dataset):
    root = make_nnunet_dataset()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "numTraining": 3}))
    problems = validate_dataset(root)
    assert [p.path.name for p in problems] == ["dataset.json", "dataset.json"]
    assert "'labels'" in problems[0].message and "'file_ending'" in problems[1].message


def test_num_training_disagrees(make_nnunet_dataset):
    root = make_nnunet_dataset(num_training=3)
    _edit_json(root, numTraining=5)
    assert "numTraining is 5 but 3 training cases" in _only(validate_dataset(root), "dataset.json").message


def test_non_consecutive_labels(make_nnunet_dataset):
    root = make_nnunet_dataset(labels={"background": 0, "organ": 1, "tumour": 3})
    messages = [p.message for p in validate_dataset(root)]
    assert any("not consecutive" in m for m in messages)


def test_file_ending_mismatch(make_nnunet_dataset, nifti_writer):
    root = make_nnunet_dataset()
    nifti_writer(root / "imagesTr" / "case_009_0000.nii", np.zeros((12, 10, 8), np.float32), (0.8, 0.8, 2.5))
    problem = _only(validate_dataset(root), "case_009_0000.nii")
    assert "file ending '.nii' differs from dataset.json file_ending '.nii.gz'" in problem.message


def test_training_case_without_label(make_nnunet_dataset):
    root = make_nnunet_dataset()
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    assert "case 'case_001' has no label" in _only(validate_dataset(root), "case_001.nii.gz").message


def test_missing_channel_file(make_nnunet_dataset):
    root = make_nnunet_dataset(channels=("T2", "ADC"))
    (root / "imagesTr" / "case_002_0001.nii.gz").unlink()
    problem = _only(validate_dataset(root), "case_002_0001.nii.gz")
    assert "channel 1 file of case 'case_002' is missing" in problem.message


def test_orphan_image_files(make_nnunet_dataset, nifti_writer):
    root = make_nnunet_dataset()
    volume = np.zeros((12, 10, 8), np.float32)
    nifti_writer(root / "imagesTr" / "scan.nii.gz", volume)
    nifti_writer(root / "imagesTr" / "case_000_0001.nii.gz", volume)
    (root / "imagesTr" / "notes.txt").write_text("hello")
    problems = {p.path.name: p.message for p in validate_dataset(root)}
    assert sorted(problems) == ["case_000_0001.nii.gz", "notes.txt", "scan.nii.gz"]
    assert "does not follow CASE_XXXX.nii.gz" in problems["scan.nii.gz"]
    assert "channel index 0001 but dataset.json declares 1 channel" in problems["case_000_0001.nii.gz"]
    assert "orphan file" in problems["notes.txt"]


def test_label_without_image(make_nnunet_dataset, nifti_writer):
    root = make_nnunet_dataset()
    nifti_writer(root / "labelsTr" / "case_077.nii.gz", np.zeros((12, 10, 8), np.uint8))
    assert "label of case 'case_077' has no image" in _only(validate_dataset(root), "case_077.nii.gz").message


def test_label_shape_differs(make_nnunet_dataset):
    root = make_nnunet_dataset()
    label = root / "labelsTr" / "case_000.nii.gz"
    _rewrite(label, data=np.zeros((12, 10, 7), np.uint8))
    assert "label shape (12, 10, 7) differs" in _only(validate_dataset(root), "case_000.nii.gz").message


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda a: a @ np.diag([1.0, 1.0, 1.2, 1.0]), "spacing"),
        (lambda a: a + np.array([[0, 0, 0, 0.5], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), "origin"),
        (lambda a: np.diag([-1.0, 1.0, 1.0, 1.0]) @ a, "direction"),
    ],
)
def test_label_affine_differs(make_nnunet_dataset, change, fragment):
    root = make_nnunet_dataset()
    label = root / "labelsTr" / "case_001.nii.gz"
    _rewrite(label, affine=change(nib.load(str(label)).affine))
    problem = _only(validate_dataset(root), "case_001.nii.gz")
    assert "label geometry differs" in problem.message and fragment in problem.message


def test_affine_within_tolerance_is_accepted(make_nnunet_dataset):
    root = make_nnunet_dataset()
    label = root / "labelsTr" / "case_001.nii.gz"
    affine = nib.load(str(label)).affine.copy()
    affine[0, 3] += 1e-4  # a ten-thousandth of a mm: header rounding, not misregistration
    _rewrite(label, affine=affine)
    assert validate_dataset(root) == []
    assert geometry_difference(affine, affine + 1e-6) is None
    assert "origin" in geometry_difference(affine, affine + np.pad(np.ones((3, 1)) * 0.01, ((0, 1), (3, 0))))


def test_channels_of_a_case_differ(make_nnunet_dataset):
    root = make_nnunet_dataset(channels=("T2", "ADC"))
    _rewrite(root / "imagesTr" / "case_000_0001.nii.gz", data=np.zeros((12, 10, 9), np.float32))
    second = root / "imagesTr" / "case_001_0001.nii.gz"
    _rewrite(second, affine=nib.load(str(second)).affine @ np.diag([2.0, 1.0, 1.0, 1.0]))
    problems = validate_dataset(root)
    assert [p.path.name for p in problems] == ["case_000_0001.nii.gz", "case_001_0001.nii.gz"]
    assert "channel shape (12, 10, 9) differs from image case_000_0000.nii.gz" in problems[0].message
    assert "channel geometry differs" in problems[1].message and "spacing" in problems[1].message


def test_undeclared_label_values(make_nnunet_dataset):
    root = make_nnunet_dataset()
    label = root / "labelsTr" / "case_002.nii.gz"
    data = np.asarray(nib.load(str(label)).dataobj).copy()
    data[0, 0, 0], data[0, 0, 1] = 5, 9
    _rewrite(label, data=data)
    problem = _only(validate_dataset(root), "case_002.nii.gz")
    assert "label values [5, 9] are not declared" in problem.message


def test_non_integer_label_values(make_nnunet_dataset):
    root = make_nnunet_dataset()
    label = root / "labelsTr" / "case_000.nii.gz"
    data = np.asarray(nib.load(str(label)).dataobj).astype(np.float32)
    data[0, 0, 0] = 0.5
    _rewrite(label, data=data)
    problem = _only(validate_dataset(root), "case_000.nii.gz")
    assert "non-integer values (0.5)" in problem.message


def test_float_labels_with_integer_values_are_fine(make_nnunet_dataset):
    root = make_nnunet_dataset()
    label = root / "labelsTr" / "case_000.nii.gz"
    _rewrite(label, data=np.asarray(nib.load(str(label)).dataobj).astype(np.float32))
    assert validate_dataset(root) == []


def test_nan_and_inf_in_image(make_nnunet_dataset):
    root = make_nnunet_dataset()
    image = root / "imagesTr" / "case_001_0000.nii.gz"
    data = np.asarray(nib.load(str(image)).dataobj).copy()
    data[1, 1, 1], data[2, 2, 2], data[3, 3, 3] = np.nan, np.nan, np.inf
    _rewrite(image, data=data)
    assert "2 NaN and 1 Inf voxels" in _only(validate_dataset(root), "case_001_0000.nii.gz").message


@pytest.mark.parametrize("spacing", [(0.8, 0.01, 2.5), (0.8, 0.8, 30.0)])
def test_implausible_spacing(make_nnunet_dataset, spacing):
    root = make_nnunet_dataset(num_training=1, spacing=spacing)
    problem = _only(validate_dataset(root), "case_000_0000.nii.gz")
    assert "implausible spacing" in problem.message and "expected 0.05 to 20 mm" in problem.message
    assert validate_dataset(root, spacing_range_mm=(0.001, 50.0)) == []


def test_zero_spacing(make_nnunet_dataset):
    """A degenerate sform is found from the header, in the label too (before, only the image's spacing was)."""
    root = make_nnunet_dataset(num_training=1)
    for folder, name in (("imagesTr", "case_000_0000.nii.gz"), ("labelsTr", "case_000.nii.gz")):
        path = root / folder / name
        image = nib.Nifti1Image(np.asarray(nib.load(str(path)).dataobj), None)
        image.header.set_sform(np.diag([0.8, 0.0, 2.5, 1.0]), code=1)  # a degenerate sform (nibabel fixes pixdim 0)
        nib.save(image, str(path))
    problems = validate_dataset(root)
    assert sorted(p.path.name for p in problems) == ["case_000.nii.gz", "case_000_0000.nii.gz"]
    assert all("sform" in p.message and "zero or singular" in p.message and "set_sform" in p.fix for p in problems)


def test_singleton_axis_of_2d_data_is_not_spacing_checked(make_nnunet_dataset):
    root = make_nnunet_dataset(num_training=2, shape=(12, 10, 1), spacing=(0.5, 0.5, 999.0))
    assert validate_dataset(root) == []


@pytest.mark.parametrize(("shape", "role"), [((12, 10), "image"), ((12, 10, 8, 2), "image"), ((12, 10, 8, 1), "label")])
def test_wrong_dimensionality(make_nnunet_dataset, shape, role):
    root = make_nnunet_dataset(num_training=1)
    path = root / ("imagesTr/case_000_0000.nii.gz" if role == "image" else "labelsTr/case_000.nii.gz")
    _rewrite(path, data=np.zeros(shape, np.float32 if role == "image" else np.uint8))
    problem = _only(validate_dataset(root), path.name)
    assert f"{role} has {len(shape)} dimensions" in problem.message and "expected 3D" in problem.message


def test_msd_4d_image_with_wrong_channel_count(make_msd_dataset):
    root = make_msd_dataset(modalities=("T2", "ADC"), num_test=0)
    _edit_json(root, modality={"0": "T2", "1": "ADC", "2": "DWI"})
    problems = validate_dataset(root)
    assert [p.path.name for p in problems] == ["prostate_00.nii.gz", "prostate_01.nii.gz"]
    assert all("expected 4D with 3 channels" in p.message for p in problems)


def test_msd_missing_and_orphan_files(make_msd_dataset, nifti_writer):
    root = make_msd_dataset(modalities=("CT",), num_test=1)
    (root / "imagesTr" / "prostate_01.nii.gz").unlink()
    nifti_writer(root / "labelsTr" / "extra.nii.gz", np.zeros((10, 9, 6), np.uint8))
    problems = {p.path.name: p.message for p in validate_dataset(root)}
    assert sorted(problems) == ["extra.nii.gz", "prostate_01.nii.gz"]
    assert "image of case 'prostate_01' is missing" in problems["prostate_01.nii.gz"]
    assert "not listed in dataset.json 'training'" in problems["extra.nii.gz"]


def test_truncated_file_is_reported_not_raised(make_nnunet_dataset):
    root = make_nnunet_dataset()
    image = root / "imagesTr" / "case_000_0000.nii.gz"
    content = image.read_bytes()
    image.write_bytes(content[: len(content) // 2])
    problem = _only(validate_dataset(root), "case_000_0000.nii.gz")
    assert "cannot be read" in problem.message


def test_garbage_file_is_reported(make_nnunet_dataset):
    root = make_nnunet_dataset()
    (root / "labelsTr" / "case_000.nii.gz").write_bytes(b"not a nifti file at all")
    assert "cannot be read" in _only(validate_dataset(root), "case_000.nii.gz").message


def test_test_split_is_checked(make_nnunet_dataset):
    root = make_nnunet_dataset(num_test=2, test_labels=True)
    (root / "labelsTs" / "test_001.nii.gz").unlink()
    _rewrite(root / "labelsTs" / "test_000.nii.gz", data=np.full((12, 10, 8), 4, np.uint8))
    problems = {p.path.name: p.message for p in validate_dataset(root)}
    assert "label values [4] are not declared" in problems["test_000.nii.gz"]
    assert "case 'test_001' has no label" in problems["test_001.nii.gz"]


def test_several_problems_in_one_call(make_nnunet_dataset, nifti_writer):
    root = make_nnunet_dataset(channels=("T2", "ADC"), num_training=4)
    _edit_json(root, numTraining=7)
    (root / "labelsTr" / "case_000.nii.gz").unlink()
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    content = (root / "imagesTr" / "case_002_0000.nii.gz").read_bytes()
    (root / "imagesTr" / "case_002_0000.nii.gz").write_bytes(content[:100])
    label = root / "labelsTr" / "case_003.nii.gz"
    _rewrite(label, data=np.full((12, 10, 8), 3, np.uint8))
    nifti_writer(root / "labelsTr" / "lonely.nii.gz", np.zeros((12, 10, 8), np.uint8))
    problems = validate_dataset(root)
    assert len(problems) == 6, "\n".join(map(str, problems))
    assert {p.path.name for p in problems} == {
        "dataset.json",
        "case_000.nii.gz",
        "case_001_0001.nii.gz",
        "case_002_0000.nii.gz",
        "case_003.nii.gz",
        "lonely.nii.gz",
    }


def test_header_only_mode_skips_voxel_checks(make_nnunet_dataset):
    root = make_nnunet_dataset()
    label = root / "labelsTr" / "case_000.nii.gz"
    _rewrite(label, data=np.full((12, 10, 8), 8, np.uint8))
    assert len(validate_dataset(root)) == 1
    assert validate_dataset(root, check_voxels=False) == []


def test_nrrd_dataset_read_with_simpleitk(make_nnunet_dataset):
    import SimpleITK as sitk

    root = make_nnunet_dataset(num_training=2)
    for path in sorted(root.glob("*sTr/*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path).replace(".nii.gz", ".nrrd"))
        path.unlink()
    _edit_json(root, file_ending=".nrrd")
    assert validate_dataset(root) == []
    label = sitk.ReadImage(str(root / "labelsTr" / "case_001.nrrd"))
    label.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(label, str(root / "labelsTr" / "case_001.nrrd"))
    assert "origin" in _only(validate_dataset(root), "case_001.nrrd").message
