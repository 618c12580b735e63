"""Dense decoders on tiny backbones of every family: output shape, gradient flow, frozen backbones, layer choice."""

from __future__ import annotations

import pytest
import torch

from medseg.backbones import create_backbone
from medseg.errors import ConfigError
from medseg.models import default_unetr_layers

CASES = [
    ("sam_vit_b", "linear"),
    ("sam_vit_b", "unetr"),
    ("sam_vit_b", "sam_mask"),
    ("dinov2_vits14", "linear"),
    ("dinov2_vits14", "unetr"),
    ("mae_vit_base", "linear"),
    ("mae_vit_base", "unetr"),
]


def _loss(logits: torch.Tensor) -> torch.Tensor:
    target = torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.long)
    target[..., : logits.shape[-1] // 2] = 1
    return torch.nn.functional.cross_entropy(logits, target)


@pytest.mark.parametrize(("backbone", "decoder"), CASES)
def test_logits_have_the_input_size_and_every_parameter_gets_a_gradient(tiny_segmenter, backbone, decoder):
    model = tiny_segmenter(backbone, decoder, num_classes=4, in_channels=2)
    size = model.img_size
    for shape in ((2, 2, size, size), (1, 2, size + 6, size - 10)):  # at and off the working size
        logits = model(torch.rand(*shape))
        assert logits.shape == (shape[0], 4, *shape[2:])
    model.zero_grad()
    _loss(model(torch.rand(2, 2, size, size))).backward()
    # full fine-tuning: every parameter takes part (an unused one would also break DDP)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(p.grad.abs().sum() > 0 for p in model.decoder.parameters() if p.ndim > 1)


@pytest.mark.parametrize(("backbone", "decoder"), [("sam_vit_b", "unetr"), ("dinov2_vits14", "linear")])
def test_frozen_backbone_gets_no_gradient(tiny_segmenter, backbone, decoder):
    model = tiny_segmenter(backbone, decoder, adapter={"method": "frozen"})
    _loss(model(torch.rand(2, 1, model.img_size, model.img_size))).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    report = model.trainable_report()["groups"]
    assert report["backbone"]["trainable"] == 0 and report["decoder"]["trainable"] == report["decoder"]["total"] > 0


def test_zscore_input_is_mapped_onto_the_unit_range(tiny_segmenter):
    unit = tiny_segmenter("mae_vit_base", "linear").eval()
    zscore = tiny_segmenter("mae_vit_base", "linear", input_range="zscore").eval()
    z = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(zscore(z), unit(z / 6 + 0.5), atol=1e-6)
        assert not torch.allclose(zscore(z), unit(z), atol=1e-3)


def test_unetr_skips_are_spread_over_the_stages(tiny_segmenter):
    model = tiny_segmenter("sam_vit_b", "unetr")
    assert model.decoder.layers == (0, 1, 2)  # 4 blocks: N/4 - 1, N/2 - 1, 3N/4 - 1
    assert model.decoder.stages == [1, 2, 3] and model.decoder.depth == 4
    custom = tiny_segmenter("sam_vit_b", "unetr", layers=[1, 3])
    assert custom.decoder.layers == (1, 3)
    assert custom(torch.rand(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_unetr_on_the_hierarchical_tinyvit_uses_each_stage_at_its_own_stride():
    backbone = create_backbone("litemedsam", pretrained=False)
    assert default_unetr_layers(backbone) == [1, 3, 9]  # last block of the stages at strides 1, 2, 4 px
    from medseg.models import UNETRDecoder

    decoder = UNETRDecoder.for_backbone(backbone, in_channels=1, num_classes=3, feature_size=8)
    assert decoder.depth == 2 and decoder.stages == [0, 1, 2]
    with pytest.raises(ConfigError, match="shallow to deep"):
        UNETRDecoder.for_backbone(backbone, in_channels=1, num_classes=3, layers=[9, 1])


def test_unknown_decoder_and_options_are_config_errors(tiny_segmenter):
    with pytest.raises(ConfigError, match="Unknown decoder"):
        tiny_segmenter("sam_vit_b", "fpn")
    with pytest.raises(ConfigError, match="linear"):
        tiny_segmenter("sam_vit_b", "linear", feature_size=3)
    with pytest.raises(ConfigError, match="SAM-family"):
        tiny_segmenter("dinov2_vits14", "sam_mask")


def test_gradient_checkpointing_is_wired_for_every_vit_family(tiny_segmenter):
    """Issue 18: SAM (and LiteMedSAM) checkpoint their blocks too; a bad value is a one-line ConfigError."""
    model = tiny_segmenter("dinov2_vits14", "linear", grad_checkpointing=True)
    assert model.backbone.checkpoint_every == 1
    sam = tiny_segmenter("sam_vit_b", "sam_mask", grad_checkpointing="all", attention="reference")
    assert sam.backbone.checkpoint_every == 1
    assert tiny_segmenter("sam_vit_b", "linear", grad_checkpointing=2).backbone.checkpoint_every == 2
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        tiny_segmenter("sam_vit_b", "linear", grad_checkpointing="often")


def test_2d_models_reject_volumes(tiny_segmenter):
    model = tiny_segmenter("sam_vit_b", "linear")
    with pytest.raises(ValueError, match="slice by slice"):
        model(torch.rand(1, 1, 64, 64, 8))
