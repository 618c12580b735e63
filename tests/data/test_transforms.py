from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, set_track_meta

from medseg.data.transforms import (
    CT_WINDOWS,
    CTWindowd,
    ForegroundZScored,
    RandSliced,
    build_transforms,
    resolve_window,
    transform_cache_key,
)
from medseg.errors import ConfigError


@pytest.mark.parametrize("name", sorted(CT_WINDOWS))
def test_named_ct_windows_clip_and_scale(name):
    level, width = CT_WINDOWS[name]
    hu = torch.tensor([[[[level - width, level - width / 2, level, level + width / 2, level + width]]]])
    out = CTWindowd(keys="image", window=name)({"image": hu})["image"]
    np.testing.assert_allclose(np.asarray(out).ravel(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_window_forms_and_errors():
    assert resolve_window("lung") == (-600.0, 1500.0)
    assert resolve_window("40:400") == (40.0, 400.0)
    assert resolve_window([50, 350]) == (50.0, 350.0)
    with pytest.raises(ConfigError, match="Unknown CT window 'abdo'"):
        resolve_window("abdo")
    with pytest.raises(ConfigError, match="positive"):
        resolve_window([40, 0])


def _head_like(rng):
    """A bright ellipsoid (foreground) with outliers, in a zero background that dominates the volume."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 40)] * 3, indexing="ij"))
    inside = (grid**2).sum(0) < 0.3
    image = np.where(inside, rng.normal(300.0, 40.0, inside.shape), 0.0)
    image[inside & (rng.random(inside.shape) < 0.002)] = 5000.0  # a few hot voxels
    return torch.tensor(image[None], dtype=torch.float32), torch.tensor(inside)


def test_mri_zscore_uses_foreground_statistics():
    image, inside = _head_like(np.random.default_rng(0))
    out = ForegroundZScored(keys="image")({"image": image})["image"][0]
    fg = out[inside]
    assert abs(float(fg.mean())) < 0.02 and abs(float(fg.std()) - 1.0) < 0.02
    # Percentile clipping bounds the hot voxels: without it they would sit about 100 standard deviations out.
    assert float(out.max()) < 4.0
    # Background is clipped to the foreground's lower percentile (about -2.6 SD), not averaged into the statistics.
    background = out[~inside]
    assert torch.allclose(background, out.min().expand_as(background))
    assert float(out.min()) < -2.0


def test_mri_minmax_mode_and_background_value():
    image, inside = _head_like(np.random.default_rng(1))
    out = ForegroundZScored(keys="image", mode="minmax", background=0.0)({"image": image})["image"][0]
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 + 1e-6
    assert float(out[~inside].abs().max()) == 0.0
    assert 0.3 < float(out[inside].mean()) < 0.7


def test_zscore_keeps_meta_and_the_inversion_trace():
    from monai.transforms import Compose, Invertd, Orientationd

    image, _ = _head_like(np.random.default_rng(2))
    meta_image = MetaTensor(image, affine=torch.diag(torch.tensor([-2.0, 2.0, 2.0, 1.0])))
    pipeline = Compose([Orientationd(keys="image", axcodes="RAS"), ForegroundZScored(keys="image")])
    out = pipeline({"image": meta_image})
    assert isinstance(out["image"], MetaTensor)
    np.testing.assert_allclose(np.asarray(out["image"].affine)[:3, :3], np.diag([2.0, 2.0, 2.0]))
    assert [op["class"] for op in out["image"].applied_operations] == ["Orientation"]
    out["pred"] = out["image"].clone()
    back = Invertd(keys="pred", transform=pipeline, orig_keys="image")(out)["pred"]
    np.testing.assert_allclose(np.asarray(back.affine), np.diag([-2.0, 2.0, 2.0, 1.0]))


def _volume_with_organ(depth=30, organ=range(20, 24)):
    label = torch.zeros(1, 16, 12, depth, dtype=torch.uint8)
    label[0, 4:10, 3:8, list(organ)] = 1
    image = MetaTensor(torch.rand(1, 16, 12, depth), affine=torch.diag(torch.tensor([0.7, 0.8, 2.5, 1.0])))
    return {"image": image, "label": label}


def test_rand_slice_positive_bias():
    always = RandSliced(keys=["image", "label"], num_samples=40, pos_fraction=1.0)
    always.set_random_state(0)
    samples = always(_volume_with_organ())
    assert len(samples) == 40
    assert all(20 <= s["slice_index"] < 24 and s["label"].sum() > 0 for s in samples)
    assert tuple(samples[0]["image"].shape) == (1, 16, 12)

    never = RandSliced(keys=["image", "label"], num_samples=200, pos_fraction=0.0)
    never.set_random_state(0)
    indices = [s["slice_index"] for s in never(_volume_with_organ())]
    share_on_organ = np.mean([20 <= i < 24 for i in indices])
    assert 0.03 < share_on_organ < 0.3  # uniform: about 4 of 30 slices
    assert len(set(indices)) > 20


def test_rand_slice_other_axis_keeps_in_plane_geometry():
    sampler = RandSliced(keys=["image", "label"], axis=0, num_samples=3, pos_fraction=1.0)
    sampler.set_random_state(3)
    sample = sampler(_volume_with_organ())[0]
    assert tuple(sample["image"].shape) == (1, 12, 30)
    assert 4 <= sample["slice_index"] < 10
    np.testing.assert_allclose(np.diag(np.asarray(sample["image"].affine))[:2], [0.8, 2.5])


def test_rand_slice_is_reproducible_with_a_seed():
    def draw(seed):
        sampler = RandSliced(keys=["image", "label"], num_samples=10, pos_fraction=0.5)
        sampler.set_random_state(seed)
        return [s["slice_index"] for s in sampler(_volume_with_organ())]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_rand_slice_copies_slices_only_and_finds_foreground_once_per_volume(monkeypatch):
    volume = _volume_with_organ()

    def plain(value):
        return value.as_tensor() if isinstance(value, MetaTensor) else value

    before = {k: plain(v).clone() for k, v in volume.items()}
    sampler = RandSliced(keys=["image", "label"], num_samples=4, pos_fraction=1.0)
    sampler.set_random_state(0)
    with torch.no_grad():
        set_track_meta(False)
        try:
            first = sampler(volume)
            calls = []
            original = torch.Tensor.ne
            monkeypatch.setattr(torch.Tensor, "ne", lambda self, *a: calls.append(1) or original(self, *a))
            second = sampler(volume)  # the same cached label again: its foreground slices are remembered
        finally:
            set_track_meta(True)
    assert calls == []
    assert all(type(s["image"]) is torch.Tensor and 20 <= s["slice_index"] < 24 for s in first + second)
    for sample in first + second:
        assert sample["image"].untyped_storage().nbytes() == sample["image"].numel() * 4  # a copy of one slice
        sample["image"].add_(1.0)  # writing into a sample ...
    assert all(torch.equal(plain(volume[k]), before[k]) for k in volume)  # ... leaves the volume as it was
    assert pickle.loads(pickle.dumps(sampler))._foreground_of == {}  # the memo of weak references does not travel


def test_build_transforms_instantiates_configs_and_reports_missing_target():
    built = build_transforms([{"_target_": "medseg.data.transforms.CTWindowd", "keys": "image", "window": "bone"}])
    assert isinstance(built[0], CTWindowd) and built[0].window == CT_WINDOWS["bone"]
    with pytest.raises(ConfigError, match="_target_"):
        build_transforms([{"keys": "image"}])


def test_cache_key_follows_the_config():
    config = [{"_target_": "medseg.data.transforms.CTWindowd", "keys": "image", "window": "abdomen"}]
    same = [{"window": "abdomen", "keys": "image", "_target_": "medseg.data.transforms.CTWindowd"}]
    other = [{"_target_": "medseg.data.transforms.CTWindowd", "keys": "image", "window": "lung"}]
    assert transform_cache_key(config) == transform_cache_key(same)
    assert transform_cache_key(config) != transform_cache_key(other)
    assert transform_cache_key(config, (1.0, 1.0, 2.0)) != transform_cache_key(config, (1.0, 1.0, 2.5))
