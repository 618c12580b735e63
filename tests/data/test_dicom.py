"""DICOM series load whatever pydicom's global validation mode was left at (MONAI appends a computed spacing)."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom import config

from medseg.data.dicom import write_dicom_series
from medseg.data.io import load_image


def test_series_with_an_unround_slice_distance_loads_under_a_raise_mode_left_behind(tmp_path):
    affine = np.diag([0.8, 0.9, 2.1 + 0.2, 1.0])  # slice distance 2.3000000000000003: 18 characters
    affine[:3, 3] = [-20.3, 11.7, -33.05]
    folder = write_dicom_series(np.zeros((6, 5, 4)), affine, tmp_path / "series")
    saved = config.settings._reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE  # as a racing Dataset.to_json_dict can leave it
    try:
        image = load_image(folder)
        assert config.settings.reading_validation_mode == config.RAISE  # restored after the read
    finally:
        config.settings._reading_validation_mode = saved
    np.testing.assert_allclose(np.asarray(image.affine), affine, atol=1e-5)


def test_a_written_series_shares_one_frame_of_reference_of_its_own(tmp_path):
    """DICOM SEG places segments by the Frame of Reference: one per series, and not another series' one."""
    first = write_dicom_series(np.zeros((4, 3, 3)), np.eye(4), tmp_path / "a")
    second = write_dicom_series(np.zeros((4, 3, 3)), np.eye(4), tmp_path / "b")
    uids = [{pydicom.dcmread(str(f)).FrameOfReferenceUID for f in sorted(s.iterdir())} for s in (first, second)]
    assert [len(u) for u in uids] == [1, 1] and uids[0] != uids[1] and "" not in uids[0] | uids[1]
