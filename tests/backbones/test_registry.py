"""Registry, channel adapter and Hydra configs of the SAM and LiteMedSAM backbones."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from medseg.backbones import create_backbone, list_backbones
from medseg.backbones.registry import get_entry
from medseg.backbones.sam import SamBackbone
from medseg.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf" / "backbone"
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "global_attn_indexes": (1,)}
OWN = ["litemedsam", "sam_vit_b", "sam_vit_h", "sam_vit_l"]


def test_sam_and_litemedsam_are_registered():
    assert set(OWN) <= set(list_backbones())
    assert list_backbones(family="sam") == ["sam_vit_b", "sam_vit_h", "sam_vit_l"]
    assert list_backbones(family="litemedsam") == ["litemedsam"]
    assert get_entry("litemedsam").locate is not None
    assert get_entry("sam_vit_h").url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ConfigError, match="Unknown backbone 'nope'") as info:
        create_backbone("nope")
    for name in OWN:
        assert name in str(info.value)


def test_one_channel_input_is_repeated():
    model = create_backbone("sam_vit_b", pretrained=False, img_size=64, arch=TINY).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ours = model(x).features
        direct = model.forward_features(model.standardise(x.repeat(1, 3, 1, 1))).features
    assert ours.shape == (2, 256, 4, 4)
    assert torch.equal(ours, direct)
    with pytest.raises(ValueError, match="expected 1 input channels"):
        model(torch.randn(1, 2, 64, 64))


def test_two_channels_are_projected_with_a_learned_convolution():
    model = create_backbone(
        "sam_vit_b", pretrained=False, img_size=64, arch=TINY, in_channels=2, channel_mode="project"
    ).eval()
    assert model.channel_adapter.proj is not None
    assert "channel_adapter.proj.weight" in dict(model.named_parameters())
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        out = model(x).features
        averaged = model.forward_features(model.standardise(x.mean(1, keepdim=True).repeat(1, 3, 1, 1))).features
    assert out.shape == (1, 256, 4, 4)
    assert torch.allclose(out, averaged, atol=1e-5)  # initialised to the channel average


def test_litemedsam_takes_two_channels_too():
    model = create_backbone("litemedsam", pretrained=False, in_channels=2, channel_mode="project")
    assert model.channel_adapter.proj.in_channels == 2 and model.channel_adapter.proj.out_channels == 3


@pytest.mark.parametrize("name", OWN)
def test_config_instantiates(name):
    config = OmegaConf.load(CONF / f"{name}.yaml")
    assert config.name == name and config.pretrained is True and config.checkpoint is None
    assert config.in_channels == 1 and config.channel_mode == "repeat"
    if name.startswith("sam"):
        assert config.img_size == 1024
        # init=scratch, with a tiny encoder for ViT-L/H so that the test stays fast (ViT-B is built at full size)
        overrides = {"pretrained": False} if name == "sam_vit_b" else {"pretrained": False, "arch": TINY}
        model = hydra.utils.instantiate(config, **overrides)
        assert isinstance(model, SamBackbone) and model.input_spec.image_size == 1024
        if name == "sam_vit_b":
            assert model.block_dim == 768
    else:
        model = hydra.utils.instantiate(config)  # the bundled pretrained weights
        assert model.name == "litemedsam" and model.input_spec.image_size == 256
