from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.io import check_header, is_dicom_series, load_case, load_image
from medseg.errors import ConfigError, ReaderError


def _nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def test_3d_file_reads_channel_first_with_its_affine(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    image = load_image(_nifti(tmp_path / "a.nii.gz", data))
    assert tuple(image.shape) == (1, 4, 5, 6)
    np.testing.assert_array_equal(np.asarray(image[0]), data)
    np.testing.assert_allclose(np.asarray(image.affine), np.diag([0.8, 0.8, 2.0, 1.0]))


def test_channel_files_are_stacked_in_order(tmp_path):
    t1 = np.full((4, 5, 6), 1.0, np.float32)
    t2 = np.full((4, 5, 6), 2.0, np.float32)
    case = load_case([_nifti(tmp_path / "c_0000.nii.gz", t1), _nifti(tmp_path / "c_0001.nii.gz", t2)])
    assert tuple(case.shape) == (2, 4, 5, 6)
    assert case[0].mean() == 1.0 and case[1].mean() == 2.0


def test_msd_4d_file_gives_one_channel_per_volume(tmp_path):
    data = np.stack([np.full((4, 5, 6), float(c), np.float32) for c in range(3)], axis=-1)
    image = load_image(_nifti(tmp_path / "brain.nii.gz", data))
    assert tuple(image.shape) == (3, 4, 5, 6)
    assert [float(image[c].mean()) for c in range(3)] == [0.0, 1.0, 2.0]


def test_channels_on_different_grids_are_refused(tmp_path):
    a = _nifti(tmp_path / "c_0000.nii.gz", np.zeros((4, 5, 6), np.float32))
    shifted = np.diag([0.8, 0.8, 2.0, 1.0])
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    b = _nifti(tmp_path / "c_0001.nii.gz", np.zeros((4, 5, 6), np.float32), shifted)
    with pytest.raises(ReaderError, match=r"c_0001\.nii\.gz"):
        load_case([a, b])


def test_truncated_file_names_the_file(tmp_path):
    path = _nifti(tmp_path / "t.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ReaderError, match=r"t\.nii\.gz.*truncated"):
        load_image(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ReaderError, match="does not exist"):
        load_image(tmp_path / "nope.nii.gz")
    other = tmp_path / "scan.mha"
    other.write_bytes(b"x")
    with pytest.raises(ReaderError, match="unsupported image format"):
        load_image(other)
    (tmp_path / "empty_folder").mkdir()
    assert not is_dicom_series(tmp_path / "empty_folder")
    with pytest.raises(ReaderError, match="no DICOM"):
        load_image(tmp_path / "empty_folder")


def test_real_dicom_file_reads():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    image = load_image(path)
    assert image.shape[0] == 1 and image.shape[1:3] == (128, 128)
    assert float(image.max()) > 1000  # CT_small holds raw stored values well above zero


def test_a_single_dicom_slice_reads_as_a_one_slice_volume_from_its_file_or_its_folder(tmp_path):
    """Before: a 2-D image whose identity slice column made a sagittal slice's affine singular; predict refused it."""
    import shutil

    import pydicom
    from pydicom.data import get_testdata_file

    from medseg.data.dicom_series import scan_file

    sagittal = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT2N" / "6293"
    for source in (get_testdata_file("CT_small.dcm"), sagittal):
        folder = tmp_path / Path(source).name
        folder.mkdir()
        shutil.copy(source, folder / "only.dcm")
        from_file, from_folder = load_image(folder / "only.dcm"), load_image(folder)
        checked = scan_file(source)
        assert tuple(from_file.shape) == (1, *checked.shape) and checked.shape[2] == 1
        np.testing.assert_allclose(np.asarray(from_file.affine), checked.slice_affine)
        np.testing.assert_array_equal(np.asarray(from_folder), np.asarray(from_file))
        np.testing.assert_array_equal(np.asarray(from_folder.affine), np.asarray(from_file.affine))
        assert abs(np.linalg.det(np.asarray(from_file.affine)[:3, :3])) > 1e-6


def test_check_header_refuses_without_reading_voxels(tmp_path, nifti_header_editor, no_voxel_reads):
    """What predict can run on every input before the heavy work: the header checks of load_image, no voxel read."""
    good = _nifti(tmp_path / "good.nii", np.zeros((4, 5, 6), np.float32))
    check_header(good)
    bad = nifti_header_editor(_nifti(tmp_path / "bad.nii", np.zeros((4, 5, 6), np.float32)), srow_z={3: float("nan")})
    with pytest.raises(ReaderError, match=r"bad\.nii: the sform .* NaN or Inf"):
        check_header(bad)
    with pytest.raises(ConfigError, match=r"series='1\.2\.3' selects a series of a DICOM folder, but .*good\.nii"):
        check_header(good, series="1.2.3")
