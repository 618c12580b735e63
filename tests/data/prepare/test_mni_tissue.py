"""The MNI tissue dataset: built offline from nilearn's files, exact crop geometry, leak-free split."""

from __future__ import annotations

import socket

import nibabel as nib
import numpy as np
import pytest

from medseg.data.formats import load_dataset_info
from medseg.data.prepare import mni_tissue
from medseg.data.validate import validate_dataset
from medseg.errors import DatasetError


def _no_network(*args, **kwargs):
    raise AssertionError("the MNI tissue builder tried to use the network")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _no_network)
        patch.setattr(socket, "create_connection", _no_network)
        return mni_tissue.build(tmp_path_factory.mktemp("data"), seed=0)


@pytest.fixture(scope="module")
def template_1mm():
    """The template as nilearn ships it (1 mm), read independently of the builder."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    t1 = load_mni152_template(resolution=1)
    gm, wm = load_mni152_gm_template(resolution=1), load_mni152_wm_template(resolution=1)
    return t1.get_fdata(), gm.get_fdata(), wm.get_fdata(), t1.affine


def _load(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def _world(shape, affine):
    index = np.argwhere(np.ones(shape, dtype=bool)).astype(np.float64)
    return index @ affine[:3, :3].T + affine[:3, 3]


def test_builds_offline_into_a_valid_dataset(dataset):
    assert dataset.name == mni_tissue.DATASET_NAME
    assert validate_dataset(dataset) == []
    info = load_dataset_info(dataset)
    assert info.labels == mni_tissue.LABELS and info.channel_names == {0: "T1"}
    assert len(info.training) == 8 and len(info.test) == 4


def test_labels_are_tissues_with_plausible_fractions(dataset):
    info = load_dataset_info(dataset)
    counts = np.zeros(3)
    for case in info.training + info.test:
        label, _ = _load(case.label)
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2}
        counts += np.bincount(label.ravel(), minlength=3)[:3]
    for case in info.test:
        assert np.all(np.bincount(_load(case.label)[0].ravel(), minlength=3) > 1000), case.case_id
    grey_share = counts[1] / (counts[1] + counts[2])
    assert 0.45 < grey_share < 0.75  # adult brains: GM/(GM+WM) about 0.55-0.6
    assert 0.2 < (counts[1] + counts[2]) / counts.sum() < 0.7  # crops are around the brain, not the whole head


def test_test_blocks_share_no_voxel_with_training_blocks(dataset):
    info = load_dataset_info(dataset)

    def points(cases):
        return np.concatenate([_world(_load(c.label)[0].shape, _load(c.label)[1]) for c in cases])

    train, test = points(info.training), points(info.test)

    # Voxel centres lie on the template's 2 mm lattice, so the half-millimetre counts identify them exactly.
    def keys(world):
        lattice = np.rint(world * 2).astype(np.int64) + 1000
        return (lattice[:, 0] * 4000 + lattice[:, 1]) * 4000 + lattice[:, 2]

    assert np.intersect1d(keys(train), keys(test)).size == 0
    assert (
        np.intersect1d(keys(train), keys(train + np.array([0.0, 0.0, 2.0]))).size > 0
    )  # the key check can see overlaps
    # Beyond disjointness: training slabs stop at least the 4 mm gap away from every test slab, in z, so neither a test
    # block nor its left-right mirror image (the template is symmetric) overlaps or touches training data.
    train_z, test_z = np.unique(train[:, 2]), np.unique(test[:, 2])
    assert np.abs(train_z[:, None] - test_z[None, :]).min() >= 4.0 + 2.0 - 1e-6  # gap + one 2 mm voxel
    assert len(train) > len(test) > 0


def test_crop_affines_place_voxels_at_their_template_position(dataset, template_1mm):
    t1, gm, wm, affine_1mm = template_1mm
    info = load_dataset_info(dataset)
    for case in (info.training[0], info.training[-1], info.test[0]):
        image, affine = _load(case.images[0])
        label, _ = _load(case.label)
        assert np.allclose(np.abs(np.diag(affine[:3, :3])), 2.0)
        # A 2 mm voxel centre lies between eight 1 mm voxel centres (offsets +-0.5 voxel): its value is their mean.
        centre = (_world(image.shape, affine) - affine_1mm[:3, 3]) @ np.linalg.inv(affine_1mm[:3, :3]).T
        corners = [np.rint(centre + np.array(offset) - 0.5).astype(int) for offset in np.ndindex(2, 2, 2)]
        expected_t1 = np.mean([t1[tuple(c.T)] for c in corners], axis=0)
        np.testing.assert_allclose(image.ravel(), expected_t1, atol=1e-5)
        grey = np.mean([gm[tuple(c.T)] for c in corners], axis=0)
        white = np.mean([wm[tuple(c.T)] for c in corners], axis=0)
        expected = mni_tissue.tissue_labels(grey, white)
        # Voxels where two tissues are equally likely (to float precision) may break the tie either way.
        ranked = np.sort(np.stack([np.clip(1 - grey - white, 0, 1), grey, white]), axis=0)
        clear = ranked[2] - ranked[1] > 1e-4
        assert clear.mean() > 0.999
        np.testing.assert_array_equal(label.ravel()[clear], expected[clear])


def test_build_is_deterministic_and_augments_training_only(dataset, tmp_path):
    augmented = mni_tissue.build(tmp_path, seed=0, augment=1)
    info, base = load_dataset_info(augmented), load_dataset_info(dataset)
    assert len(info.training) == 16 and len(info.test) == 4
    for a, b in zip(info.test, base.test):
        np.testing.assert_array_equal(_load(a.images[0])[0], _load(b.images[0])[0])
    copies = [c for c in info.training if "_aug" in c.case_id]
    assert len(copies) == 8
    source = next(c for c in info.training if c.case_id == copies[0].case_id.split("_aug")[0])
    (copy_image, copy_affine), (source_image, source_affine) = _load(copies[0].images[0]), _load(source.images[0])
    np.testing.assert_array_equal(copy_affine, source_affine)
    assert not np.allclose(copy_image, source_image)
    assert np.corrcoef(copy_image.ravel(), source_image.ravel())[0, 1] > 0.8  # deformed, still the same block


def test_probability_maps_are_read_honestly_from_either_dtype():
    stored = np.array([[[0, 51, 255]]], dtype=np.uint8)
    as_uint8 = nib.Nifti1Image(stored, np.eye(4))
    as_float = nib.Nifti1Image(stored.astype(np.float32) / 255, np.eye(4))
    np.testing.assert_allclose(mni_tissue._probability(as_uint8, "gm"), [[[0, 0.2, 1]]], atol=1e-6)
    np.testing.assert_allclose(mni_tissue._probability(as_float, "gm"), [[[0, 0.2, 1]]], atol=1e-6)
    with pytest.raises(DatasetError, match="not probabilities"):
        mni_tissue._probability(nib.Nifti1Image(stored.astype(np.float32), np.eye(4)), "gm")


def test_failed_build_leaves_no_dataset(tmp_path, monkeypatch):
    real_write, calls = mni_tissue.write_nifti, []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(mni_tissue, "write_nifti", failing_write)
    with pytest.raises(DatasetError, match="simulated"):
        mni_tissue.build(tmp_path)
    assert list(tmp_path.iterdir()) == []
