"""NIfTI headers refused before any voxel is read: declared size, truncation, NaN/zero pixdim, broken sform/qform.

Each test goes through :func:`medseg.data.io.load_image`, the reader of training, ``medseg predict`` and napari, and
most through ``medseg validate`` too, so a bad header fails in one line naming the file and the fix everywhere.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medseg.data.headers import HeaderError, read_nifti_header
from medseg.data.io import load_image
from medseg.data.validate import validate_dataset
from medseg.errors import ReaderError

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def scan(tmp_path, nifti_writer):
    """A small uncompressed NIfTI with a 0.8 x 0.9 x 2.5 mm grid, both sform and qform set (code 1)."""
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 30.0]
    path = nifti_writer(tmp_path / "scan.nii", np.arange(60, dtype=np.float32).reshape(3, 4, 5), affine=affine)
    image = nib.load(str(path))
    image.set_qform(affine, code=1)
    nib.save(image, str(path))
    return path


def _refused(path, *words):
    with pytest.raises(ReaderError) as caught:
        load_image(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message, message
    return message


def test_a_header_declaring_1000_cubed_voxels_is_refused_by_the_memory_limit_before_any_read(
    tmp_path, header_only_writer, no_voxel_reads, monkeypatch
):
    path = header_only_writer(tmp_path / "huge.nii.gz", (1000, 1000, 1000))
    assert path.stat().st_size < 400  # the attack: a few hundred bytes that declare 4 GB
    monkeypatch.setenv("MEDSEG_MAX_INPUT_GB", "1")
    message = _refused(path, "(1000, 1000, 1000)", "float32", "4.0 GB", "MEDSEG_MAX_INPUT_GB")
    assert "export MEDSEG_MAX_INPUT_GB=" in message


def test_a_header_declaring_more_than_the_file_can_hold_is_refused_as_truncated_before_any_read(
    tmp_path, header_only_writer, no_voxel_reads, monkeypatch
):
    monkeypatch.setenv("MEDSEG_MAX_INPUT_GB", "100")  # the size is allowed; the file still cannot hold the voxels
    _refused(header_only_writer(tmp_path / "huge.nii.gz", (1000, 1000, 1000)), "compressed file has only", "re-export")
    plain = tmp_path / "short.nii"
    plain.write_bytes(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)).to_bytes()[:2000])
    _refused(plain, "(20, 20, 20)", "the file has only 2000 bytes")


def test_validate_reports_the_1000_cubed_header_without_reading_it(
    make_nnunet_dataset, header_only_writer, no_voxel_reads, monkeypatch
):
    root = make_nnunet_dataset(num_training=1)
    header_only_writer(root / "imagesTr" / "case_000_0000.nii.gz", (1000, 1000, 1000))
    monkeypatch.setenv("MEDSEG_MAX_INPUT_GB", "1")
    # The label's voxels are read as usual (and refused by no_voxel_reads); the image's must not be.
    problems = [p for p in validate_dataset(root) if p.path.name == "case_000_0000.nii.gz"]
    assert len(problems) == 1, "\n".join(map(str, problems))
    assert "4.0 GB" in problems[0].message and "MEDSEG_MAX_INPUT_GB" in problems[0].fix


@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_nan_or_inf_in_the_sform_is_refused(scan, nifti_header_editor, bad):
    nifti_header_editor(scan, srow_y={3: bad})
    _refused(scan, "sform", "NaN or Inf", "set_sform")


@pytest.mark.parametrize(("index", "bad"), [(2, NAN), (3, INF), (1, 0.0), (1, -0.8)], ids=["nan", "inf", "0", "<0"])
def test_nan_inf_zero_or_negative_pixdim_is_refused(scan, nifti_header_editor, index, bad):
    pixdim = [1.0, 0.8, 0.9, 2.5, 1.0, 1.0, 1.0, 1.0]
    pixdim[index] = bad
    nifti_header_editor(scan, pixdim=pixdim)
    _refused(scan, "pixdim", "set_zooms")


def test_a_zero_sform_is_refused_instead_of_silently_using_the_qform(scan, nifti_header_editor):
    nifti_header_editor(scan, srow_x=[0, 0, 0, 0], srow_y=[0, 0, 0, 0], srow_z=[0, 0, 0, 0])
    _refused(scan, "sform (sform_code 2) is zero or singular", "img.set_sform(None, code=0)")


def test_a_singular_sform_is_refused(scan, nifti_header_editor):
    nifti_header_editor(scan, srow_z=[0.0, 0.9, 0.0, 30.0])  # the third axis along the second: a plane
    _refused(scan, "zero or singular")


def test_the_qform_is_used_when_the_header_says_so(scan, nifti_header_editor):
    """sform_code 0 with a zero sform: the qform is what the header states, and every reader agrees on it."""
    nifti_header_editor(scan, sform_code=0, srow_x=[0, 0, 0, 0], srow_y=[0, 0, 0, 0], srow_z=[0, 0, 0, 0])
    expected = np.diag([0.8, 0.9, 2.5, 1.0])
    expected[:3, 3] = [-10.0, 5.0, 30.0]
    np.testing.assert_allclose(np.asarray(load_image(scan).affine), expected, atol=1e-5)


def test_nan_in_the_qform_is_refused(scan, nifti_header_editor):
    nifti_header_editor(scan, quatern_b=NAN)
    _refused(scan, "qform", "NaN or Inf", "set_qform")


def test_an_sform_that_disagrees_with_pixdim_is_refused_not_swapped_for_the_qform(scan, nifti_header_editor):
    """MONAI quietly replaces an sform whose voxel sizes differ from pixdim by the qform; nibabel uses the sform."""
    nifti_header_editor(scan, srow_x=[1.6, 0.0, 0.0, -10.0])  # a valid sform, 1.6 mm where pixdim and qform say 0.8
    _refused(scan, "sform and its qform/pixdim disagree", "spacing", "img.set_qform(img.affine, code=1)")


def test_validate_reports_a_broken_header_with_its_fix(make_nnunet_dataset, nifti_header_editor):
    root = make_nnunet_dataset(num_training=1)
    nifti_header_editor(root / "imagesTr" / "case_000_0000.nii.gz", srow_x={0: NAN})
    problems = validate_dataset(root)
    assert [p.path.name for p in problems] == ["case_000_0000.nii.gz"]
    assert "NaN or Inf" in problems[0].message and "set_sform" in problems[0].fix


def test_read_nifti_header_returns_the_lazy_image_of_a_good_file(scan):
    image = read_nifti_header(scan)
    assert image.shape == (3, 4, 5)
    assert image.dataobj.is_proxy  # nothing read yet


def test_header_errors_keep_the_problem_and_the_fix_apart(scan, nifti_header_editor):
    nifti_header_editor(scan, pixdim=[1.0, 0.8, NAN, 2.5, 1.0, 1.0, 1.0, 1.0])
    with pytest.raises(HeaderError) as caught:
        read_nifti_header(scan)
    assert caught.value.path == scan and "pixdim" in caught.value.problem and "set_zooms" in caught.value.fix
