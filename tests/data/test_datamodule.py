"""The datamodule composed from the shipped configs, on a small synthetic dataset built once per module."""

from __future__ import annotations

import logging
from copy import deepcopy

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from monai.data import CacheDataset, MetaTensor, PersistentDataset
from monai.transforms import Invertd

import medseg.data.datamodule as datamodule_module
from medseg.config import instantiate
from medseg.data.prepare import synthetic
from medseg.errors import ConfigError, DatasetError

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
    relit = lung.dataset_for("val")[0]  # preprocessed anew under the new key: the lung window's intensities
    assert relit["case_id"] == cached["case_id"] and any(lung.cache_path.iterdir())
    assert not torch.equal(relit["image"].as_tensor(), cached["image"].as_tensor())
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


# --- the training data path: cached arrays read without copies, samples seeded per (seed, epoch, case) -------------


def _snapshot(items):
    """Every cached value, copied: tensors with dtype and bytes, MetaTensors with affine, meta and inversion trace."""

    def copy(value):
        if isinstance(value, MetaTensor):
            return ("meta", value.as_tensor().clone(), deepcopy(value.meta), deepcopy(value.applied_operations))
        if isinstance(value, torch.Tensor):
            return ("tensor", value.clone())
        return ("other", deepcopy(value))

    return [{key: copy(value) for key, value in item.items()} for item in items]


def _same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "other":
        return bool(np.array_equal(np.asarray(a[1]), np.asarray(b[1])))
    if a[1].dtype != b[1].dtype or not torch.equal(a[1], b[1]):
        return False
    if a[0] == "meta":
        meta_a, meta_b = a[2], b[2]
        return sorted(meta_a) == sorted(meta_b) and len(a[3]) == len(b[3]) and repr(a[3]) == repr(b[3])
    return True


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.sampling.size=32", "data.augment.affine_prob=1.0", "data.augment.elastic_prob=0.5"],
        ["data/sampling=patches_3d", "data/augment=default_3d", "data.sampling.patch_size=[16,16,8]",
         "data.augment.affine_prob=1.0"],
    ],
    ids=["slices_2d", "patches_3d"],
)  # fmt: skip
def test_sampling_for_several_epochs_leaves_the_memory_cache_bit_for_bit(data_root, overrides):
    dm = make_datamodule(data_root, "data.cache=memory", "data.num_workers=0", *overrides)
    dm.setup()
    source = dm.dataset_for("train").source
    assert source[0] is source._cache[0]  # the cached case itself reaches the sampler: no copy per step
    before = _snapshot(source._cache)
    loader = dm.train_dataloader()
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            assert type(batch["image"]) is torch.Tensor  # training samples carry no metadata
    after = _snapshot(source._cache)
    for item_before, item_after in zip(before, after, strict=True):
        assert sorted(item_before) == sorted(item_after)
        for key in item_before:
            assert _same(item_before[key], item_after[key]), key


def _epochs(dm, epochs=(0, 1)):
    loader = dm.train_dataloader()
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out.append([(b["case_id"], b["slice_index"].tolist(), b["image"].clone(), b["label"].clone()) for b in loader])
    return out


def test_augmented_batches_differ_per_epoch_and_do_not_depend_on_workers(data_root):
    common = ["data.cache=memory", "data.sampling.size=32", "data.augment.affine_prob=1.0", "data.seed=5"]
    main = _epochs(make_datamodule(data_root, *common, "data.num_workers=0"))
    workers = _epochs(make_datamodule(data_root, *common, "data.num_workers=1", "data.persistent_workers=true"))
    assert not torch.equal(main[0][0][2], main[1][0][2])  # another epoch, other samples
    for epoch_main, epoch_workers in zip(main, workers, strict=True):
        for a, b in zip(epoch_main, epoch_workers, strict=True):
            assert a[0] == b[0] and a[1] == b[1]
            assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    again = _epochs(make_datamodule(data_root, *common, "data.num_workers=0"), epochs=(1,))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(main[1], again[0], strict=True))  # (seed, epoch) reproduces
    other_seed = _epochs(make_datamodule(data_root, *common, "data.num_workers=0", "data.seed=6"), epochs=(1,))
    assert any(not torch.equal(a[2], b[2]) for a, b in zip(main[1], other_seed[0], strict=True))


def test_random_transforms_at_probability_zero_are_left_out(data_root):
    off = make_datamodule(data_root, "data.cache=none", "data.augment.elastic_prob=0.0")
    on = make_datamodule(data_root, "data.cache=none", "data.augment.elastic_prob=0.5")
    off.setup(), on.setup()
    names = {type(t).__name__ for t in off.dataset_for("train").random.transforms}
    assert "Rand2DElasticd" not in names and "RandRotate90d" not in names and "RandSliced" in names
    assert "Rand2DElasticd" in {type(t).__name__ for t in on.dataset_for("train").random.transforms}


def test_the_training_disk_cache_follows_the_cached_sampling_transforms(data_root, tmp_path):
    patches = ["data.cache=disk", f"data.cache_dir={tmp_path}", "data/sampling=patches_3d", "data/augment=default_3d"]
    small = make_datamodule(data_root, *patches, "data.sampling.patch_size=[16,16,8]")
    large = make_datamodule(data_root, *patches, "data.sampling.patch_size=[64,64,32]")
    small.setup(), large.setup()
    assert small.cache_path == large.cache_path  # validation cases: the deterministic config only
    assert small.train_cache_path != large.train_cache_path  # training cases are cached padded to the patch size
    assert tuple(large.dataset_for("train").source[0]["image"].shape[1:]) >= (64, 64, 32)
    assert large.train_cache_path.is_dir() and any(large.train_cache_path.iterdir())
    slices = make_datamodule(data_root, "data.cache=disk", f"data.cache_dir={tmp_path}")
    slices.setup()
    assert slices.train_cache_path == slices.cache_path  # nothing of the slice sampling is cached


def test_cache_auto_keeps_small_datasets_in_memory_and_large_ones_on_disk(data_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(datamodule_module, "available_bytes", lambda: 64e9)
    with caplog.at_level(logging.INFO, logger="medseg.data.loader_settings"):
        roomy = make_datamodule(data_root, "data.cache=auto", f"data.cache_dir={tmp_path}")
        roomy.setup()
    assert roomy.cache_mode == "memory" and isinstance(roomy.dataset_for("val"), CacheDataset)
    assert "data.cache=auto: memory" in caplog.text
    monkeypatch.setattr(datamodule_module, "available_bytes", lambda: 1e5)  # a few cases exceed half of 100 kB
    tight = make_datamodule(data_root, "data.cache=auto", f"data.cache_dir={tmp_path}")
    tight.setup()
    assert tight.cache_mode == "disk" and isinstance(tight.dataset_for("val"), PersistentDataset)
    assert tight.cache_path is not None and tight.cache_path.parent == tmp_path


def test_loader_settings_reach_the_loaders_and_whole_cases_are_not_pinned(data_root):
    dm = make_datamodule(data_root, "data.cache=none", "data.num_workers=1", "data.pin_memory=true")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.num_workers == val.num_workers == 1 and train.persistent_workers and val.persistent_workers
    assert train.pin_memory and not val.pin_memory and not dm.test_dataloader().pin_memory
    with pytest.raises(ConfigError, match="data.num_workers must be"):
        make_datamodule(data_root, "data.num_workers=many")
