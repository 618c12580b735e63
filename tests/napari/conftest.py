"""Fixtures of the napari plugin tests (the stand-in model, LiteMedSAM and the blobs are in tests/conftest.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medseg.inference.loaded import LoadedModel


@pytest.fixture(scope="session")
def litemedsam_loaded(litemedsam) -> LoadedModel:
    return LoadedModel(litemedsam, "promptable", source="litemedsam (test)")


OBLIQUE_AFFINE = np.array(
    [
        [-0.7, 0.05, 0.0, 91.5],
        [-0.04, -0.68, 0.1, 120.25],
        [0.0, 0.12, 2.5, -72.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


@pytest.fixture
def nifti_case(tmp_path, blobs):
    """``(path, sform)``: a NIfTI of the blob volume with an oblique, flipped sform (code 2) and a qform (code 1)
    that differs from it, as scanners write them."""
    volume, _ = blobs
    image = nib.Nifti1Image(volume, OBLIQUE_AFFINE)
    image.set_sform(OBLIQUE_AFFINE, code=2)
    qform = OBLIQUE_AFFINE.copy()
    qform[:3, 3] += 0.5  # a viewer preferring the qform must still find the labels where the image is
    image.set_qform(qform, code=1)
    path = tmp_path / "case_07.nii.gz"
    nib.save(image, path)
    return path, OBLIQUE_AFFINE
