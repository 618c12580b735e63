"""Input discovery of ``medseg predict -i``: which cases a path holds and what they are called."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medseg.data.dicom import write_dicom_series
from medseg.errors import InputShapeError, ReaderError
from medseg.inference.cases import case_name, discover_cases, read_case


def nifti(path, shape=(6, 5, 4)):
    nib.save(nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), np.eye(4)), path)
    return path


def test_names_drop_nifti_suffixes_only():
    assert case_name("/a/liver_007.nii.gz") == "liver_007"
    assert case_name("b.NII") == "b"
    assert case_name("/data/CT_series.1") == "CT_series.1"
    assert case_name("/data/slice.dcm") == "slice"


def test_a_single_dicom_file_is_a_dicom_case_read_as_a_one_slice_volume(tmp_path):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    (case,) = discover_cases(path)
    assert (case.name, case.is_dicom) == ("CT_small", True)
    assert tuple(read_case(case.path).shape) == (1, 128, 128, 1)
    (tmp_path / "scan.png").write_bytes(b"not an image")
    with pytest.raises(ReaderError, match="neither a NIfTI file .* nor a DICOM file"):
        discover_cases(tmp_path / "scan.png")


def test_a_folder_holds_nifti_files_and_dicom_series_sorted(tmp_path):
    nifti(tmp_path / "b.nii.gz")
    nifti(tmp_path / "a.nii")
    nifti(tmp_path / ".a_partial.tmp.nii.gz")  # hidden: an unfinished write
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty_folder").mkdir()
    write_dicom_series(np.zeros((6, 5, 3)), np.eye(4), tmp_path / "series")
    cases = discover_cases(tmp_path)
    assert [(c.name, c.path.name, c.is_dicom) for c in cases] == [
        ("a", "a.nii", False), ("b", "b.nii.gz", False), ("series", "series", True)
    ]  # fmt: skip
    assert [c.name for c in discover_cases(tmp_path / "series")] == ["series"]
    assert [c.name for c in discover_cases(tmp_path / "b.nii.gz")] == ["b"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.nii.gz", "does not exist"),
        (lambda p: (p / "scan.mha").write_text("x") and p / "scan.mha", "neither a NIfTI file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no NIfTI files"),
        (lambda p: nifti(p / "x.nii") and nifti(p / "x.nii.gz") and p, "several inputs named"),
    ],
)
def test_discovery_errors_name_the_path(tmp_path, make, message):
    with pytest.raises(ReaderError, match=message):
        discover_cases(make(tmp_path))


def test_read_case_gives_channels_first_with_the_affine(tmp_path):
    image = read_case(nifti(tmp_path / "a.nii.gz"), channels=1)
    assert tuple(image.shape) == (1, 6, 5, 4)
    np.testing.assert_array_equal(np.asarray(image.affine), np.eye(4))


def test_nnunet_channel_files_are_one_case_named_without_the_suffix(tmp_path):
    for case in ("liver_001", "liver_002"):
        for channel in (0, 1):
            nifti(tmp_path / f"{case}_{channel:04d}.nii.gz")
    cases = discover_cases(tmp_path)
    assert [(c.name, [p.name for p in c.inputs]) for c in cases] == [
        ("liver_001", ["liver_001_0000.nii.gz", "liver_001_0001.nii.gz"]),
        ("liver_002", ["liver_002_0000.nii.gz", "liver_002_0001.nii.gz"]),
    ]
    image = read_case(cases[0].inputs, channels=2)
    assert tuple(image.shape) == (2, 6, 5, 4)
    np.testing.assert_array_equal(np.asarray(image.affine), np.eye(4))
    assert [c.name for c in discover_cases(tmp_path / "liver_001_0000.nii.gz")] == ["liver_001"]


@pytest.mark.parametrize(
    "names",
    [
        ["scan_2019", "scan_2020"],  # years, not channels 0000..n-1
        ["a_0000", "a_0001", "b_0000"],  # cases with different channel counts
        ["a_0000", "notes"],  # not every file is named the nnU-Net way
    ],
)
def test_files_not_named_the_nnunet_way_stay_one_case_each(tmp_path, names):
    for name in names:
        nifti(tmp_path / f"{name}.nii.gz")
    assert [c.name for c in discover_cases(tmp_path)] == sorted(names)
    assert all(c.inputs == (c.path,) for c in discover_cases(tmp_path))


def test_channels_on_different_grids_are_refused_naming_the_file(tmp_path):
    nifti(tmp_path / "a_0000.nii.gz")
    nifti(tmp_path / "a_0001.nii.gz", shape=(6, 5, 3))
    (case,) = discover_cases(tmp_path)
    with pytest.raises(InputShapeError, match="a_0001.nii.gz is not on the grid of"):
        read_case(case.inputs)
