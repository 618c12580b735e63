"""The synthetic CT phantoms: determinism, content, geometry defined in world coordinates, atomic building."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import ndimage

from medseg.config import CONFIG_DIR
from medseg.data.formats import load_dataset_info
from medseg.data.prepare import mni_tissue, synthetic
from medseg.data.splits import NNUNET_PREPROCESSED, SPLITS_FILE, load_or_create_splits, make_kfold_splits
from medseg.data.validate import validate_dataset
from medseg.errors import ConfigError, DatasetError

SMALL = {"num_train": 5, "num_test": 1, "shape": (48, 48, 24)}  # 6 cases cover every orientation and one tilt


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return synthetic.build(tmp_path_factory.mktemp("data"), seed=3, **SMALL)


def _arrays(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def test_make_phantom_is_deterministic_for_a_seed():
    a = synthetic.make_phantom(5, shape=(32, 32, 16))
    b = synthetic.make_phantom(np.random.default_rng(5), shape=(32, 32, 16))
    c = synthetic.make_phantom(6, shape=(32, 32, 16))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])
    assert a[0].dtype == np.float32 and a[1].dtype == np.uint8


def test_build_is_deterministic(tmp_path, small_dataset):
    again = synthetic.build(tmp_path, seed=3, **SMALL)
    files = sorted(p.relative_to(small_dataset) for p in small_dataset.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.nii.gz"))
    for relative in files:
        (a, affine_a), (b, affine_b) = _arrays(small_dataset / relative), _arrays(again / relative)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(affine_a, affine_b)
    other = synthetic.build(tmp_path / "other", seed=4, **SMALL)
    assert not np.array_equal(_arrays(other / files[0])[0], _arrays(small_dataset / files[0])[0])


def test_built_dataset_is_valid_and_every_label_is_in_every_case(small_dataset):
    assert small_dataset.name == synthetic.DATASET_NAME
    assert validate_dataset(small_dataset) == []
    info = load_dataset_info(small_dataset)
    assert info.labels == synthetic.LABELS
    assert info.channel_names == {0: "CT"}
    assert len(info.training) == SMALL["num_train"] and len(info.test) == SMALL["num_test"]
    for case in info.training + info.test:
        label, label_affine = _arrays(case.label)
        image, image_affine = _arrays(case.images[0])
        assert image.dtype == np.int16 and label.dtype == np.uint8
        np.testing.assert_array_equal(label_affine, image_affine)
        assert set(np.unique(label)) == set(synthetic.LABELS.values()), case.case_id


def test_organ_intensities_are_in_their_hu_ranges():
    image, label, _ = synthetic.make_phantom(11, shape=(64, 64, 32))
    medians = {name: float(np.median(image[label == value])) for name, value in synthetic.LABELS.items()}
    assert abs(medians["liver"] - synthetic.HU["liver"]) < 35
    assert abs(medians["spleen"] - synthetic.HU["spleen"]) < 35
    assert abs(medians["kidney"] - synthetic.HU["kidney"]) < 40
    assert medians["bone"] > 250
    assert medians["kidney"] > medians["spleen"] > medians["liver"]
    assert np.median(image[:2, :2, :]) < -900  # corners are air
    body = (label == 0) & (image > -300) & (image < 300)
    assert -20 < np.median(image[body]) < 80  # soft tissue around the organs
    noise = np.std(image[label == synthetic.LABELS["liver"]])
    assert 10 < noise < 40  # noisy but separable


def test_built_cases_have_anisotropic_non_ras_and_oblique_geometry(small_dataset):
    codes, oblique, anisotropy = set(), 0, []
    for path in sorted((small_dataset / "imagesTr").glob("*.nii.gz")) + sorted(
        (small_dataset / "imagesTs").glob("*.nii.gz")
    ):
        affine = nib.load(path).affine
        codes.add("".join(nib.aff2axcodes(affine)))
        zooms = np.linalg.norm(affine[:3, :3], axis=0)
        anisotropy.append(zooms.max() / zooms.min())
        directions = affine[:3, :3] / zooms
        oblique += not np.allclose(np.abs(directions).max(axis=0), 1.0)
    assert {"RAS", "LPS", "LAS", "LIA"} <= codes
    assert oblique >= 1
    assert min(anisotropy) > 1.2


def test_lps_and_permuted_phantoms_are_the_same_world_object():
    shape, spacing = (40, 36, 20), (1.6, 1.7, 2.6)
    _, ras, _ = synthetic.make_phantom(21, shape=shape, spacing=spacing)
    _, lps, _ = synthetic.make_phantom(21, shape=shape, spacing=spacing, orientation="LPS")
    np.testing.assert_array_equal(lps, ras[::-1, ::-1, :])
    assert not np.array_equal(lps, ras)  # the anatomy is not symmetric, so the check above is meaningful
    # LIA: axis 0 = x reversed, axis 1 = z reversed, axis 2 = y.
    _, lia, _ = synthetic.make_phantom(21, shape=(40, 20, 36), spacing=(1.6, 2.6, 1.7), orientation="LIA")
    np.testing.assert_array_equal(lia, np.transpose(ras, (0, 2, 1))[::-1, ::-1, :])


def test_oblique_phantom_labels_the_same_world_points():
    shape, spacing = (64, 64, 32), (1.6, 1.6, 2.5)
    _, ras, ras_affine = synthetic.make_phantom(9, shape=shape, spacing=spacing)
    _, tilted, tilted_affine = synthetic.make_phantom(
        9, shape=shape, spacing=spacing, orientation="LPS", oblique_degrees=12.0, oblique_axis=(1.0, 1.0, 0.3)
    )
    assert not np.allclose(np.abs(tilted_affine[:3, :3]).max(axis=0), spacing)  # really oblique
    index = np.argwhere(np.ones(shape, dtype=bool))[::3]
    world = index @ tilted_affine[:3, :3].T + tilted_affine[:3, 3]
    in_ras = np.rint((world - ras_affine[:3, 3]) @ np.linalg.inv(ras_affine[:3, :3]).T).astype(int)
    inside = np.all((in_ras >= 1) & (in_ras <= np.array(shape) - 2), axis=1)
    # Compare only points whose 3x3x3 RAS neighbourhood has one label: the label there is unambiguous.
    uniform = ndimage.minimum_filter(ras, size=3) == ndimage.maximum_filter(ras, size=3)
    i, j, k = in_ras[inside].T
    keep = uniform[i, j, k]
    expected = ras[i[keep], j[keep], k[keep]]
    a, b, c = index[inside][keep].T
    np.testing.assert_array_equal(tilted[a, b, c], expected)
    assert keep.sum() > 5000
    assert set(np.unique(expected)) == set(synthetic.LABELS.values())


def test_bad_orientation_is_refused():
    with pytest.raises(ConfigError, match="orientation"):
        synthetic.make_phantom(0, shape=(8, 8, 8), orientation="RAR")


def test_failed_build_leaves_no_dataset(tmp_path, monkeypatch):
    real_write, calls = synthetic.write_nifti, []

    def failing_write(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_nifti", failing_write)
    with pytest.raises(DatasetError, match="simulated"):
        synthetic.build(tmp_path, num_train=2, num_test=1, shape=(16, 16, 8))
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temporary folder


def test_existing_dataset_is_kept_unless_forced(tmp_path, monkeypatch):
    first = synthetic.build(tmp_path, seed=1, num_train=1, num_test=0, shape=(16, 16, 8))
    before = _arrays(first / "labelsTr" / "phantom_000.nii.gz")[0]
    with pytest.raises(DatasetError, match="force"):
        synthetic.build(tmp_path, seed=2, num_train=1, num_test=0, shape=(16, 16, 8))

    def broken(*args, **kwargs):
        raise OSError("interrupted (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "write_nifti", broken)
        with pytest.raises(DatasetError, match="simulated"):
            synthetic.build(tmp_path, seed=2, num_train=1, num_test=0, shape=(16, 16, 8), force=True)
    np.testing.assert_array_equal(_arrays(first / "labelsTr" / "phantom_000.nii.gz")[0], before)
    synthetic.build(tmp_path, seed=2, num_train=1, num_test=0, shape=(16, 16, 8), force=True)
    assert not np.array_equal(_arrays(first / "labelsTr" / "phantom_000.nii.gz")[0], before)
    assert [p.name for p in tmp_path.iterdir()] == [synthetic.DATASET_NAME]


@pytest.mark.parametrize("module", [synthetic, mni_tissue], ids=["synthetic", "mni_tissue"])
def test_the_demos_fold_count_is_their_configs(module):
    """The folds a demo is built with are those its conf/data file trains on (and its results were published with)."""
    name = {synthetic: "synthetic", mni_tissue: "mni_tissue"}[module]
    assert OmegaConf.load(Path(CONFIG_DIR) / "data" / f"{name}.yaml").num_folds == module.NUM_FOLDS


def test_the_demo_is_built_with_the_folds_of_its_published_results(small_dataset, monkeypatch):
    """medseg's earlier permutation (seed 12345), not the nnU-Net folds a new dataset gets, and a run reads them."""
    monkeypatch.delenv(NNUNET_PREPROCESSED, raising=False)
    ids = [f"phantom_{i:03d}" for i in range(SMALL["num_train"])]
    splits = json.loads((small_dataset / SPLITS_FILE).read_text())
    assert splits == make_kfold_splits(ids, synthetic.NUM_FOLDS, 12345)
    assert load_or_create_splits(small_dataset, ids, num_folds=5) == splits
    assert synthetic.build(small_dataset.parent / "tiny", num_train=2, num_test=0, shape=(16, 16, 8)).is_dir()
    assert not (small_dataset.parent / "tiny" / synthetic.DATASET_NAME / SPLITS_FILE).exists()  # 2 cases, 4 folds
