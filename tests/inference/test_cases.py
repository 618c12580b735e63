"""Input discovery of ``medseg predict -i``: which cases a path holds and what they are called."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medseg.data.dicom import write_dicom_series
from medseg.errors import ReaderError
from medseg.inference.cases import case_name, discover_cases, read_case


def nifti(path, shape=(6, 5, 4)):
    nib.save(nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), np.eye(4)), path)
    return path


def test_names_drop_nifti_suffixes_only():
    assert case_name("/a/liver_007.nii.gz") == "liver_007"
    assert case_name("b.NII") == "b"
    assert case_name("/data/CT_series.1") == "CT_series.1"


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
        (lambda p: (p / "scan.mha").write_text("x") and p / "scan.mha", "not a NIfTI file"),
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
