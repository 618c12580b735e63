"""The datamodule composed from the shipped configs, on a small synthetic dataset built once per module."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from monai.transforms import Invertd

from medseg.config import instantiate
from medseg.data.prepare import synthetic
from medseg.errors import DatasetError

CONF = str((__import__("pathlib").Path(__file__).parents[2] / "conf").resolve())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.build(root, seed=0, num_train=8, num_test=2, shape=(48, 48, 20))
    return root


def make_datamodule(data_root, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            config_name=None,
            overrides=["+paths=default", "+data=synthetic", f"data.data_root={data_root}", *overrides],
        )
    return instantiate(cfg.data)


def test_2d_slices_from_the_shipped_config(data_root):
    dm = make_datamodule(
        data_root, "data.cache=none", "data/augment=none", "data.sampling.size=64", "data.sampling.num_samples=3"
    )
    dm.setup()
    assert dm.num_classes == 5 and dm.num_channels == 1
    assert len(dm.train_ids) == 6 and len(dm.val_ids) == 2 and len(dm.test_ids) == 2
    assert set(dm.train_ids).isdisjoint(dm.val_ids)
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["image"].shape) == (2 * 3, 1, 64, 64)
    assert tuple(batch["label"].shape) == (2 * 3, 1, 64, 64)
    assert set(np.unique(np.asarray(batch["label"]))) <= {0, 1, 2, 3, 4}
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0  # abdomen window in [0, 1]


def test_3d_patches_from_the_shipped_config(data_root):
    dm = make_datamodule(
        data_root, "data.cache=none", "data/sampling=patches_3d", "data/augment=default_3d",
        "data.sampling.patch_size=[32,32,16]", "data.augment.affine_prob=0.0",
    )  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["image"].shape) == (2 * 2, 1, 32, 32, 16)
    assert float(batch["label"].gt(0).float().mean()) > 0  # positive sampling finds organs


def test_label_fraction_keeps_a_nested_subset(data_root):
    full = make_datamodule(data_root, "data.cache=none")
    half = make_datamodule(data_root, "data.cache=none", "data.label_fraction=0.5")
    full.setup(), half.setup()
    assert set(half.train_ids) < set(full.train_ids) and len(half.train_ids) == 3
    assert half.val_ids == full.val_ids  # validation never shrinks with the budget


@pytest.mark.parametrize("preset", ["ct", "mri"])
def test_validation_prediction_inverts_onto_the_native_grid(data_root, preset):
    dm = make_datamodule(
        data_root, "data.cache=memory", f"data/preprocess={preset}", "data.preprocess.spacing=[1.5,1.5,2.5]"
    )
    dm.setup()
    item = dm.dataset_for("val")[0]
    native = nib.load(str(dict((c.case_id, c) for c in dm.info.training)[item["case_id"]].label))
    assert tuple(item["label"].shape[1:]) != native.shape  # resampled and cropped
    item["pred"] = item["label"].clone()
    inverted = Invertd(keys="pred", transform=dm.deterministic_transform, orig_keys="label", nearest_interp=True)(item)[
        "pred"
    ]
    assert tuple(inverted.shape[1:]) == native.shape
    np.testing.assert_allclose(np.asarray(inverted.affine), native.affine, atol=1e-4)
    truth = np.asanyarray(native.dataobj)
    agreement = float((np.asarray(inverted[0]).round() == truth)[truth > 0].mean())
    assert agreement > 0.9  # nearest-neighbour round trip through a coarser grid keeps organs in place


def test_disk_cache_key_changes_with_the_preprocessing(data_root, tmp_path):
    abdomen = make_datamodule(data_root, "data.cache=disk", f"data.cache_dir={tmp_path}")
    abdomen.setup()
    abdomen.dataset_for("val")[0]
    first = abdomen.cache_path
    assert first.is_dir() and any(first.iterdir())
    cached = abdomen.dataset_for("val")[0]  # read back from disk: still a MetaTensor with its inversion trace
    assert [op["class"] for op in cached["image"].applied_operations] == [
        "Orientation",
        "SpatialResample",
        "CropForeground",
    ]
    cached["pred"] = cached["label"].clone()
    back = Invertd(keys="pred", transform=abdomen.deterministic_transform, orig_keys="label", nearest_interp=True)(
        cached
    )["pred"]
    native = nib.load(str(dict((c.case_id, c) for c in abdomen.info.training)[cached["case_id"]].label))
    assert tuple(back.shape[1:]) == native.shape
    again = make_datamodule(data_root, "data.cache=disk", f"data.cache_dir={tmp_path}")
    again.setup()
    assert again.cache_path == first
    lung = make_datamodule(data_root, "data.cache=disk", f"data.cache_dir={tmp_path}", "data.preprocess.window=lung")
    lung.setup()
    assert lung.cache_path != first
    augmented = make_datamodule(data_root, "data.cache=disk", f"data.cache_dir={tmp_path}", "data.augment.flip_prob=0")
    augmented.setup()
    assert augmented.cache_path == first  # random transforms are not cached, so they do not change the key


def test_median_spacing_comes_from_the_fingerprint(data_root):
    dm = make_datamodule(data_root, "data.cache=none", "data.preprocess.spacing=median")
    dm.setup()
    from medseg.data.fingerprint import load_or_compute_fingerprint

    assert dm.target_spacing == pytest.approx(load_or_compute_fingerprint(dm.info).median_spacing)
    image = dm.dataset_for("val")[0]["image"]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0), dm.target_spacing, atol=1e-4)


def test_unknown_dataset_says_which_variable_to_set(data_root):
    with pytest.raises(DatasetError, match="MEDSEG_DATA"):
        make_datamodule(data_root, "data.dataset=Dataset123_Missing")
