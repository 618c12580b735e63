"""Every conf/model yaml composes with its backbone group and instantiates into a working model (tiny sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from medseg.models import BaselineModel, Segmenter

CONF = Path(__file__).resolve().parents[2] / "conf"
SAM_ARCH = "+model.arch={depth:2,embed_dim:32,num_heads:2,global_attn_indexes:[1]}"
MAE_ARCH = "+model.arch={depth:2,embed_dim:32,num_heads:2,img_size:64}"

CASES = {
    "vit_linear": (["+backbone=mae_vit_base", "backbone.pretrained=false", MAE_ARCH, "+backbone.img_size=64"], 2),
    "vit_unetr": (
        ["+backbone=sam_vit_b", "backbone.pretrained=false", SAM_ARCH, "backbone.img_size=64", "model.feature_size=4"],
        2,
    ),
    "sam_mask": (["+backbone=sam_vit_b", "backbone.pretrained=false", SAM_ARCH, "backbone.img_size=64"], 2),
    "unet_2d": (["model.channels=[4,8]", "model.strides=[2]"], 2),
    "unet_3d": (["model.channels=[4,8]", "model.strides=[2]", "+model.patch_size=[16,16,16]"], 3),
    "dynunet_3d": (["model.patch_size=[32,32,16]", "model.spacing=[0.8,0.8,3.0]", "+model.filters=[4,8,8,8]"], 3),
    "swinunetr_3d": (
        [
            "model.patch_size=[64,64,64]",
            "model.feature_size=12",
            "+model.depths=[1,1,1,1]",
            "+model.num_heads=[1,1,1,1]",
        ],
        3,
    ),
}


# Promptable models take prompts as well as an image; test_promptable.py and test_volumetric.py build their configs.
# Classifiers compose with conf/classify.yaml, not train.yaml (see test_classifier.py, test_classify_configs.py).
PROMPTABLE = {"promptable_2d", "promptable_3d"}
CLASSIFIERS = {"classifier", "classifier_densenet"}


def test_every_model_config_has_a_case():
    assert {p.stem for p in (CONF / "model").glob("*.yaml")} == set(CASES) | PROMPTABLE | CLASSIFIERS


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_config_instantiates(name):
    overrides, dims = CASES[name]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name=None, overrides=[f"+model={name}", *overrides])
    model = instantiate(cfg.model, num_classes=3, in_channels=1)
    assert isinstance(model, BaselineModel if name.startswith(("unet", "dynunet", "swin")) else Segmenter)
    assert (model.spatial_dims, model.num_classes, model.in_channels) == (dims, 3, 1)
    shape = (1, 1, 64, 64) if dims == 2 else (1, 1, *([64] * 3 if name == "swinunetr_3d" else [32, 32, 16]))
    with torch.no_grad():
        assert model(torch.rand(*shape)).shape == (1, 3, *shape[2:])


def test_init_switch_changes_only_the_weights():
    """pretrained=true/false differ in initial weights only: same architecture, names and shapes."""
    base = ["+model=sam_mask", "+backbone=sam_vit_b", SAM_ARCH, "backbone.img_size=64"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name=None, overrides=[*base, "backbone.pretrained=false"])
    assert cfg.model.pretrained is False and cfg.model.backbone == "sam_vit_b" and cfg.model.img_size == 64
    assert "num_classes" not in cfg.model and "in_channels" not in cfg.model


def test_backbone_compute_settings_reach_the_model():
    """Issue 18: backbone.attention and backbone.activation_checkpointing are honoured by the model builders."""
    from medseg.backbones.attention import attention_mode

    base = ["+model=sam_mask", "+backbone=sam_vit_b", SAM_ARCH, "backbone.img_size=64", "backbone.pretrained=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        default = compose(config_name=None, overrides=base)
        chosen = compose(
            config_name=None, overrides=[*base, "backbone.attention=reference", "backbone.activation_checkpointing=2"]
        )
    model = instantiate(default.model, num_classes=3, in_channels=1)
    assert attention_mode(model.backbone) == "fused" and model.backbone.checkpoint_every == 0
    model = instantiate(chosen.model, num_classes=3, in_channels=1)
    assert attention_mode(model.backbone) == "reference" and model.backbone.checkpoint_every == 2
