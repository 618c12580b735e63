"""A DICOM folder is read as one complete, regular series, or refused in one line naming the files and positions.

The series are written by :func:`medseg.data.dicom.write_dicom_series` (one file per slice, ``slice_0000.dcm``...,
InstanceNumber k + 1 at the k-th position), then broken the way the red team broke them: a slice removed, a slice
copied, a second series dropped into the folder, one slice's orientation or pixel spacing changed. The real series
of pydicom's test data show that a regular series keeps loading exactly as MONAI reads it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from monai.data import PydicomReader
from monai.transforms import LoadImage

from medseg.data.dicom import write_dicom_series
from medseg.data.dicom_series import scan_series
from medseg.data.io import load_image
from medseg.errors import ReaderError

SPACING = (0.8, 0.9, 2.09)
DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"


def _volume(seed: int = 0, shape=(6, 5, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.int16)


@pytest.fixture
def series(tmp_path) -> Path:
    """A CT series of 8 slices, 2.09 mm apart, with a shifted origin."""
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-12.5, 20.0, -40.0]
    return write_dicom_series(_volume(), affine, tmp_path / "series", series_description="abdomen")


def _edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(str(path))
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(str(path))


def _refused(folder, *words, series=None) -> str:
    with pytest.raises(ReaderError) as caught:
        load_image(folder, series=series) if series is not None else load_image(folder)
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message
    for word in words:
        assert word in message, message
    return message


def test_a_complete_series_loads_with_its_spacing(series):
    image = load_image(series)
    assert tuple(image.shape) == (1, 6, 5, 8)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0), SPACING, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(image[0]), _volume())


def test_a_missing_slice_is_an_error_naming_the_gap_not_the_mean_spacing(series):
    (series / "slice_0003.dcm").unlink()  # read before as 7 slices 2.39 mm apart, every slice after 3 misplaced
    _refused(series, "not evenly spaced", "slice_0002.dcm", "slice_0004.dcm", "4.180 mm", "2.090 mm")


def test_a_duplicated_slice_is_an_error_naming_both_files(series):
    shutil.copy(series / "slice_0005.dcm", series / "slice_0005_copy.dcm")
    _refused(series, "duplicated slices", "slice_0005.dcm", "slice_0005_copy.dcm")


def test_two_series_in_one_folder_are_listed_not_stacked(series, tmp_path):
    other = write_dicom_series(_volume(1), np.diag([*SPACING, 1.0]), tmp_path / "other", series_description="lung")
    for path in other.iterdir():
        shutil.copy(path, series / f"lung_{path.name}")
    uids = {pydicom.dcmread(str(f / "slice_0000.dcm")).SeriesInstanceUID for f in (series, other)}
    message = _refused(series, "2 DICOM series", "'abdomen', 8 files", "'lung', 8 files", "series=", "own folder")
    assert all(uid in message for uid in uids)


def test_a_series_is_selected_by_uid_or_by_its_description(series, tmp_path):
    lung = write_dicom_series(_volume(1), np.diag([*SPACING, 1.0]), tmp_path / "other", series_description="lung")
    uid = pydicom.dcmread(str(lung / "slice_0000.dcm")).SeriesInstanceUID
    for path in lung.iterdir():
        shutil.copy(path, series / f"lung_{path.name}")
    np.testing.assert_array_equal(np.asarray(load_image(series, series=uid)[0]), _volume(1))
    np.testing.assert_array_equal(np.asarray(load_image(series, series="Abdomen")[0]), _volume(0))
    assert scan_series(series, series=uid).files == tuple(series / f"lung_slice_{k:04d}.dcm" for k in range(8))
    _refused(series, "no DICOM series with the UID or description 'liver'", "'lung'", series="liver")


def test_two_series_with_one_description_need_the_uid(series, tmp_path):
    again = write_dicom_series(_volume(1), np.diag([*SPACING, 1.0]), tmp_path / "again", series_description="abdomen")
    for path in again.iterdir():
        shutil.copy(path, series / f"again_{path.name}")
    _refused(series, "2 DICOM series are described as 'abdomen'", "SeriesInstanceUID", series="abdomen")


def test_slices_of_different_orientations_are_refused(series):
    _edit(series / "slice_0004.dcm", ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0])
    _refused(series, "different orientations", "slice_0004.dcm")


def test_slices_of_different_pixel_spacings_are_refused(series):
    _edit(series / "slice_0006.dcm", PixelSpacing=[0.9, 0.85])
    _refused(series, "different pixel spacings", "slice_0006.dcm")


def test_an_instance_number_order_against_the_positions_is_refused(series):
    """MONAI stacks by InstanceNumber: swapped numbers would swap the slices' voxels under one regular affine."""
    _edit(series / "slice_0002.dcm", InstanceNumber=4)
    _edit(series / "slice_0003.dcm", InstanceNumber=3)
    _refused(series, "InstanceNumber order does not follow the slice positions")


def test_a_series_above_the_memory_limit_is_refused_before_its_pixels_are_read(series, monkeypatch):
    monkeypatch.setenv("MEDSEG_MAX_INPUT_GB", "1e-7")  # 100 bytes; the series takes 960
    monkeypatch.setattr("monai.transforms.LoadImage.__call__", lambda *a, **k: pytest.fail("pixels were read"))
    _refused(series, "(6, 5, 8)", "MEDSEG_MAX_INPUT_GB")


def test_other_files_in_the_folder_are_not_read(series):
    (series / "notes.txt").write_text("not DICOM")
    (series / "sub").mkdir()  # MONAI's glob would hand the folder to pydicom
    assert tuple(load_image(series).shape) == (1, 6, 5, 8)


def test_a_real_regular_series_loads_exactly_as_monai_reads_it():
    folder = DICOMDIR_TESTS / "98892001" / "CT5N"  # 5 CT slices, 2.5 mm apart
    image = load_image(folder)
    reference = LoadImage(reader=PydicomReader(), image_only=True)(str(folder))
    assert tuple(image.shape) == (1, 16, 16, 5)
    np.testing.assert_array_equal(np.asarray(image[0]), np.asarray(reference))
    np.testing.assert_allclose(np.asarray(image.affine), np.asarray(reference.affine))
    assert abs(float(np.linalg.norm(np.asarray(image.affine)[:3, 2])) - 2.5) < 1e-6


def test_real_broken_series_are_refused():
    """pydicom's test folders: a 202 mm jump between 1.25 mm slices; three series (localizer and pilots)."""
    _refused(DICOMDIR_TESTS / "77654033" / "CT2", "not evenly spaced", "17106", "17136", "202.500 mm")
    _refused(DICOMDIR_TESTS / "98892003" / "MR2", "3 DICOM series", "'FAST LOCALIZER', 1 file")
    _refused(DICOMDIR_TESTS / "98892003" / "MR700", "different orientations")
