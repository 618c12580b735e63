"""MONAI baselines: 2-D/3-D shapes at any input size, nnU-Net topology planning, the shared model interface."""

from __future__ import annotations

import pytest
import torch

from medseg.errors import ConfigError
from medseg.models import SegmentationModel, build_baseline, plan_dynunet

SMALL = {
    "unet": {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1},
    "dynunet": {"filters": None},
    "swinunetr": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
}


@pytest.mark.parametrize("name", ["unet", "dynunet", "swinunetr"])
@pytest.mark.parametrize(
    ("dims", "patch", "shape"), [(2, [64, 64], (2, 2, 50, 61)), (3, [48, 48, 40], (1, 2, 36, 33, 35))]
)
def test_forward_keeps_the_input_size(name, dims, patch, shape):
    kwargs = dict(SMALL[name])
    if name == "dynunet":
        kwargs = {"filters": [4, 8, 16, 16, 16, 16][: len(plan_dynunet(patch)["strides"])]}
    model = build_baseline(name, dims, in_channels=2, num_classes=3, patch_size=patch, **kwargs)
    assert isinstance(model, SegmentationModel) and model.spatial_dims == dims
    with torch.no_grad():
        logits = model(torch.rand(*shape))
    assert logits.shape == (shape[0], 3, *shape[2:])
    with pytest.raises(ValueError, match="inputs"):
        model(torch.rand(1, 1, *shape[2:]))


def test_dynunet_plan_pools_in_plane_first_for_anisotropic_ct():
    plan = plan_dynunet([128, 128, 32], [0.8, 0.8, 3.0])
    # worked by hand with nnU-Net v2's rule: z (3 mm) joins once in-plane spacing reaches 1.6 mm (ratio < 2);
    # z stops at 4 voxels (< 2 * min_feature_map_size), x/y go on to 4 voxels.
    assert plan["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert plan["kernel_size"] == [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert plan["upsample_kernel_size"] == plan["strides"][1:]
    assert plan["filters"] == [32, 64, 128, 256, 320, 320]


def test_dynunet_plan_isotropic_and_2d():
    plan = plan_dynunet([64, 64, 64], [1.0, 1.0, 1.0])
    assert plan["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 4 and all(k == [3, 3, 3] for k in plan["kernel_size"])
    plan2d = plan_dynunet([384, 128])  # y stops at 4 px; x alone goes on while at least 3 * 4 px
    assert plan2d["strides"] == [[1, 1]] + [[2, 2]] * 5 + [[2, 1]] and plan2d["filters"][-1] == 512
    assert plan_dynunet([256, 128])["strides"] == [[1, 1]] + [[2, 2]] * 5  # x at 8 px < 12: no lone pooling


def test_dynunet_config_errors():
    with pytest.raises(ConfigError, match="spacing"):
        build_baseline("dynunet", 3, 1, 2, [32, 32, 32], spacing="median")
    with pytest.raises(ConfigError, match="deep_supervision"):
        build_baseline("dynunet", 3, 1, 2, [32, 32, 32], deep_supervision=True)
    with pytest.raises(ConfigError, match="patch"):
        build_baseline("dynunet", 3, 1, 2, None)
    with pytest.raises(ConfigError, match="Unknown baseline"):
        build_baseline("vnet", 3, 1, 2, [32, 32, 32])
    with pytest.raises(ConfigError, match="more than 32"):
        build_baseline("swinunetr", 3, 1, 2, [32, 32, 32])


def test_baseline_trains_everything_at_the_base_rate():
    model = build_baseline("unet", 2, 1, 2, [32, 32], **SMALL["unet"])
    groups = model.param_groups(lr=3e-4, backbone_lr_scale=0.1, layer_decay=0.5, weight_decay=1e-5)
    assert {g["lr"] for g in groups} == {3e-4}
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())
    report = model.trainable_report()
    assert report["groups"]["decoder"]["trainable"] == report["trainable"] == report["total"] > 0
