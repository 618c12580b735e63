"""Label-map writer: the reference's qform and sform survive (even when they differ), types, errors, atomicity."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.inference import InferenceError, write_label_map


def oblique_affine(spacing=(0.8, 1.1, 3.0), degrees=12.0, offset=(-40.0, 20.0, 7.5)) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1, -1, 1]) @ np.diag(spacing)  # LPS-like, rotated
    affine[:3, 3] = offset
    return affine


@pytest.fixture
def reference(tmp_path):
    """A CT-like int16 file with scaling, whose qform (code 1) and sform (code 2, shifted) differ."""
    data = np.full((9, 8, 5), -1000, dtype=np.int16)
    image = nib.Nifti1Image(data, oblique_affine())
    sform = oblique_affine(offset=(-39.0, 21.0, 7.5))
    image.set_qform(oblique_affine(), code=1)
    image.set_sform(sform, code=2)
    image.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "ref_0000.nii.gz"
    nib.save(image, path)
    return path


def test_qform_and_sform_are_copied_with_their_codes(reference, tmp_path):
    labels = np.zeros((9, 8, 5), dtype=np.int64)
    labels[2:5, 3:6, 1:4] = 3
    path = write_label_map(labels, reference, tmp_path / "out" / "pred.nii.gz")
    written, source = nib.load(path), nib.load(reference)
    np.testing.assert_allclose(written.get_qform(), source.get_qform(), atol=1e-6)
    np.testing.assert_allclose(written.get_sform(), source.get_sform(), atol=1e-6)
    assert not np.allclose(written.get_qform(), written.get_sform())
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)
    assert written.get_data_dtype() == np.uint8
    assert written.header.get_slope_inter() in ((1.0, 0.0), (None, None))
    assert written.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    assert [p.name for p in path.parent.iterdir()] == ["pred.nii.gz"]  # no temporary file left


def test_affine_only_reference_sets_both_forms(tmp_path):
    affine = oblique_affine()
    labels = MetaTensor(torch.ones(1, 4, 3, 2, dtype=torch.int64) * 300, affine=torch.as_tensor(affine))
    path = write_label_map(labels, labels, tmp_path / "pred.nii")
    written = nib.load(path)
    assert written.get_data_dtype() == np.uint16  # more than 255 labels
    np.testing.assert_allclose(written.get_qform(), affine, atol=1e-6)
    np.testing.assert_allclose(written.get_sform(), affine, atol=1e-6)
    assert written.shape == (4, 3, 2) and int(np.asanyarray(written.dataobj).max()) == 300


def test_bad_label_maps_are_refused(reference, tmp_path):
    with pytest.raises(InferenceError, match=r"ref_0000\.nii\.gz"):
        write_label_map(np.zeros((9, 8, 4), dtype=np.uint8), reference, tmp_path / "p.nii.gz")
    with pytest.raises(InferenceError, match="non-integer"):
        write_label_map(np.full((9, 8, 5), 0.5), reference, tmp_path / "p.nii.gz")
    with pytest.raises(InferenceError, match="negative"):
        write_label_map(np.full((9, 8, 5), -1), reference, tmp_path / "p.nii.gz")
    with pytest.raises(InferenceError, match="4x4"):
        write_label_map(np.zeros((9, 8, 5), dtype=np.uint8), np.eye(3), tmp_path / "p.nii.gz")
    assert not (tmp_path / "p.nii.gz").exists()
