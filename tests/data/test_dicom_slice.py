"""A single DICOM slice becomes a one-slice volume placed as SimpleITK places it, for real files of pydicom's data.

MONAI reads a single slice as 2-D with an identity slice column, singular for a sagittal slice; the one-slice volume's
third axis is the slice normal times SpacingBetweenSlices (as ITK), else SliceThickness (where ITK takes 1 mm),
else 1 mm with a warning. Pixels must stay MONAI's, only the geometry changes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.data import PydicomReader
from monai.transforms import EnsureChannelFirst, LoadImage
from pydicom.data import get_testdata_file

from medseg.data.dicom_series import scan_file, scan_series
from medseg.data.dicom_slice import ASSUMED_SPACING, one_slice_volume, slice_affine
from medseg.errors import ReaderError

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _monai_2d(path) -> object:
    return EnsureChannelFirst()(LoadImage(reader=PydicomReader(), image_only=True)(str(path)))


def _volume(path):
    checked = scan_file(path)
    return checked, one_slice_volume(_monai_2d(path), checked.slice_affine, checked.slice_spacing, path)


def _itk_ras_affine(path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _oblique_mr() -> str:
    path = get_testdata_file("MR2_UNCI.dcm")  # pydicom-data: 1024 x 1024, rows at 55 degrees in the axial plane
    if path is None:
        pytest.skip("pydicom-data's MR2_UNCI.dcm is not installed (pip install pydicom-data)")
    return path


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR2_UNCI.dcm", "dicomdirtests/98892001/CT2N/6293", "dicomdirtests/98892001/CT2N/6924"]
)
def test_a_single_slice_is_placed_as_simpleitk_places_it(name):
    """Axial CT, an oblique MR, a sagittal and a coronal CT localizer: every pixel at SimpleITK's world position."""
    path = _oblique_mr() if name == "MR2_UNCI.dcm" else str(TEST_FILES / name)
    checked, volume = _volume(path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert tuple(volume.shape) == (1, int(header.Columns), int(header.Rows), 1)
    affine, itk = np.asarray(volume.affine), _itk_ras_affine(path)
    assert abs(np.linalg.det(affine[:3, :3])) > 1e-6  # MONAI's 2-D affine is singular for the sagittal slice
    np.testing.assert_allclose(affine[:3, [0, 1, 3]], itk[:3, [0, 1, 3]], atol=1e-4)  # in-plane axes and origin
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    np.testing.assert_allclose(normal, itk[:3, 2] / np.linalg.norm(itk[:3, 2]), atol=1e-6)
    expected = float(header.get("SpacingBetweenSlices") or header.get("SliceThickness"))
    assert np.linalg.norm(affine[:3, 2]) == pytest.approx(expected)
    if checked.slice_spacing == "SpacingBetweenSlices":  # then ITK uses the same spacing
        np.testing.assert_allclose(affine, itk, atol=1e-4)
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(path))[0].T  # ITK (z, y, x) -> (columns, rows)
    np.testing.assert_allclose(np.asarray(volume[0, :, :, 0]), pixels, rtol=1e-5)


def test_a_one_file_folder_and_its_file_give_the_same_volume(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "only.dcm")
    from_folder, from_file = scan_series(tmp_path), scan_file(tmp_path / "only.dcm")
    assert from_folder.files == from_file.files and from_folder.affine is None  # MONAI's read is 2-D as before
    np.testing.assert_array_equal(from_folder.slice_affine, from_file.slice_affine)
    assert (from_file.shape, from_file.slice_spacing) == ((128, 128, 1), "SpacingBetweenSlices")
    # the folder read of MONAI (glob of the folder) becomes the same volume as the file read
    folder_volume = one_slice_volume(_monai_2d(tmp_path), from_folder.slice_affine, from_folder.slice_spacing, tmp_path)
    file_volume = _volume(tmp_path / "only.dcm")[1]
    np.testing.assert_array_equal(np.asarray(folder_volume), np.asarray(file_volume))
    np.testing.assert_array_equal(np.asarray(folder_volume.affine), np.asarray(file_volume.affine))


def test_the_slice_spacing_falls_back_to_the_thickness_then_to_1_mm_with_a_warning(tmp_path, caplog):
    mr = get_testdata_file("MR_small.dcm")  # SliceThickness 0.8, no SpacingBetweenSlices
    assert scan_file(mr).slice_spacing == "SliceThickness"
    assert np.linalg.norm(scan_file(mr).slice_affine[:3, 2]) == pytest.approx(0.8)
    ds = pydicom.dcmread(mr)
    del ds.SliceThickness
    bare = tmp_path / "bare.dcm"
    ds.save_as(str(bare))
    checked = scan_file(bare)
    assert checked.slice_spacing == ASSUMED_SPACING
    with caplog.at_level(logging.WARNING, logger="medseg.data.dicom_slice"):
        volume = one_slice_volume(_monai_2d(bare), checked.slice_affine, checked.slice_spacing, bare)
    assert np.linalg.norm(np.asarray(volume.affine)[:3, 2]) == pytest.approx(1.0)
    assert [r.getMessage() for r in caplog.records if "bare.dcm" in r.getMessage() and "1 mm" in r.getMessage()]


def test_a_slice_without_geometry_is_left_as_monai_reads_it(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.ImageOrientationPatient
    path = tmp_path / "no_orientation.dcm"
    ds.save_as(str(path))
    checked = scan_file(path)
    assert checked.slice_affine is None and checked.slice_spacing is None
    image = _monai_2d(path)
    assert one_slice_volume(image, checked.slice_affine, checked.slice_spacing, path) is image
    position, orientation, spacing = np.zeros(3), np.array([1.0, 0, 0, 1.0, 0, 0]), np.ones(2)
    assert slice_affine(position, orientation, spacing, 2.0, None) == (None, None)  # parallel rows and columns


def test_a_reader_that_places_the_slice_elsewhere_is_refused():
    path = get_testdata_file("CT_small.dcm")
    checked = scan_file(path)
    shifted = checked.slice_affine.copy()
    shifted[:3, 3] += [0.0, 0.5, 0.0]
    with pytest.raises(ReaderError, match=r"placed the slice's first pixel at .* header implies") as caught:
        one_slice_volume(_monai_2d(path), shifted, checked.slice_spacing, path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_a_dicom_object_without_an_image_is_refused_and_a_multi_frame_file_left_to_monai():
    with pytest.raises(ReaderError, match="without an image"):
        scan_file(get_testdata_file("rtplan.dcm"))
    frames = scan_file(get_testdata_file("rtdose.dcm"))  # 15 frames: MONAI reads it as a volume itself
    assert frames.shape == (10, 10, 15) and frames.affine is None and frames.slice_affine is None
