"""A point at known world coordinates stays there through load -> orientation -> spacing -> inversion.

The scan is a Gaussian blob centred on a world point ``p`` (mm, RAS+). Its intensity-weighted centroid, mapped
through whatever affine the data carries at each stage, must land on ``p``: after resampling (within half an output
voxel) and after inverting back onto the input grid (within half an input voxel). The same scan is written as
NIfTI and as a DICOM series, so the test also checks that both readers put it in one world frame.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, Invertd, Orientationd, Spacingd

from medseg.data.dicom import write_dicom_series
from medseg.data.io import LoadCased

TARGET_SPACING = (1.0, 1.25, 1.5)
BLOB_CENTRE = np.array([-3.3, 12.7, 41.2])  # mm, RAS+
BLOB_SIGMA_MM = 4.0


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def _affine(kind: str, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """A voxel->RAS affine whose grid is centred near the blob."""
    if kind == "ras":
        linear = np.diag(spacing)
    elif kind == "lps":
        linear = np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    elif kind == "oblique":  # permuted axes, a flip, and rotations about two axes
        permute = np.eye(3)[:, [1, 0, 2]] @ np.diag([1.0, -1.0, 1.0])
        linear = _rotation(2, 17.0) @ _rotation(0, -9.0) @ permute @ np.diag(spacing)
    else:
        raise ValueError(kind)
    affine = np.eye(4)
    affine[:3, :3] = linear
    centre_index = (np.array(shape) - 1) / 2
    affine[:3, 3] = BLOB_CENTRE + np.array([1.7, -2.1, 0.9]) - linear @ centre_index
    return affine


def _blob(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    return 1000.0 * np.exp(-np.sum((world - BLOB_CENTRE) ** 2, axis=-1) / (2 * BLOB_SIGMA_MM**2))


def _world_centroid(volume: torch.Tensor, affine: torch.Tensor) -> np.ndarray:
    values = np.asarray(volume[0], dtype=float)
    values = np.where(values > 0.05 * values.max(), values, 0.0)
    index = np.stack(np.nonzero(values), axis=-1).astype(float)
    weights = values[tuple(index.astype(int).T)]
    centroid = (index * weights[:, None]).sum(0) / weights.sum()
    affine = np.asarray(affine, dtype=float)
    return affine[:3, :3] @ centroid + affine[:3, 3]


def _voxel_half_diagonal(affine) -> float:
    return 0.5 * float(np.linalg.norm(np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)))


@pytest.fixture(params=["ras", "lps", "oblique"])
def scan(request, tmp_path):
    shape, spacing = (40, 36, 22), (0.8, 0.9, 2.5)
    affine = _affine(request.param, shape, spacing)
    data = np.round(_blob(shape, affine)).astype(np.int16)
    nifti = tmp_path / f"{request.param}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(nifti))
    dicom = write_dicom_series(data, affine, tmp_path / f"{request.param}_dicom")
    return {"nifti": nifti, "dicom": dicom, "affine": affine}


def _pipeline() -> Compose:
    return Compose(
        [
            LoadCased(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=TARGET_SPACING, mode="bilinear"),
        ]
    )


@pytest.mark.parametrize("source", ["nifti", "dicom"])
def test_world_point_survives_orientation_spacing_and_inversion(scan, source):
    pipeline = _pipeline()
    loaded = LoadCased(keys="image")({"image": scan[source]})["image"]
    assert np.linalg.norm(_world_centroid(loaded, loaded.affine) - BLOB_CENTRE) < 0.05

    out = pipeline({"image": scan[source]})
    image = out["image"]
    assert np.allclose(np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0), TARGET_SPACING, atol=1e-4)
    after = _world_centroid(image, image.affine)
    assert np.linalg.norm(after - BLOB_CENTRE) <= _voxel_half_diagonal(image.affine)

    out["pred"] = image.clone()
    inverted = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=False)(out)["pred"]
    assert tuple(inverted.shape[1:]) == tuple(loaded.shape[1:])
    assert np.allclose(np.asarray(inverted.affine), np.asarray(loaded.affine), atol=1e-4)
    back = _world_centroid(inverted, inverted.affine)
    assert np.linalg.norm(back - BLOB_CENTRE) <= _voxel_half_diagonal(loaded.affine)


def test_nifti_and_dicom_of_one_scan_share_the_world_frame(scan):
    from_nifti = LoadCased(keys="image")({"image": scan["nifti"]})["image"]
    from_dicom = LoadCased(keys="image")({"image": scan["dicom"]})["image"]
    assert np.allclose(np.asarray(from_nifti.affine), scan["affine"], atol=1e-5)
    # Voxel by voxel: each DICOM voxel's world position holds the value the NIfTI has there.
    a_nifti, a_dicom = np.asarray(from_nifti.affine), np.asarray(from_dicom.affine)
    index = np.stack(np.meshgrid(*[np.arange(s) for s in from_dicom.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
    world = index @ a_dicom[:3, :3].T + a_dicom[:3, 3]
    in_nifti = np.rint((world - a_nifti[:3, 3]) @ np.linalg.inv(a_nifti[:3, :3]).T).astype(int)
    np.testing.assert_array_equal(np.asarray(from_dicom[0]).reshape(-1), np.asarray(from_nifti[0])[tuple(in_nifti.T)])
