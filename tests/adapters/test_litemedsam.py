"""The methods on the real LiteMedSAM TinyViT (pretrained weights): where they attach, and two real forwards."""

from __future__ import annotations

import copy

import pytest
import torch

from medseg.adapters import apply_adapters, merge_adapters
from medseg.backbones import create_backbone
from medseg.errors import ConfigError

# TinyViT: stage 0 is 2 MBConv blocks (convolutions only), then 2 + 6 + 2 attention blocks.
ATTENTION_BLOCKS = 10


@pytest.fixture(scope="module")
def litemedsam():
    return create_backbone("litemedsam").eval()


def _count(model, suffix: str) -> int:
    return sum(1 for n, _ in model.named_modules() if n.endswith(suffix))


@pytest.mark.parametrize(
    ("method", "suffix", "count"),
    [
        ("lora", "attn.qkv.lora_A.default", ATTENTION_BLOCKS),
        ("lora", "attn.proj.lora_B.default", ATTENTION_BLOCKS),
        ("adaptformer", ".adaptformer", ATTENTION_BLOCKS),
        ("adapter3d", ".adapter3d", ATTENTION_BLOCKS),
    ],
)
def test_attention_stage_sites(litemedsam, method, suffix, count):
    model = copy.deepcopy(litemedsam)
    apply_adapters(model, {"method": method})
    assert _count(model, suffix) == count
    assert not any("layers.0." in n for n, _ in model.named_modules() if method in n or "lora_" in n)


def test_ssf_bitfit_norm_reach_every_stage(litemedsam):
    model = copy.deepcopy(litemedsam)
    apply_adapters(model, {"methods": [{"method": "ssf"}, {"method": "bitfit"}]})
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    # SSF after qkv, proj, fc1, fc2 and the two LayerNorms of each attention block
    assert sum(n.endswith("ssf_scale") for n in trained) == 6 * ATTENTION_BLOCKS
    # BitFit includes the BatchNorm biases of the convolution stage and the neck's LayerNorm2d
    assert "image_encoder.layers.0.blocks.0.conv1.bn.bias" in trained
    assert "image_encoder.neck.1.bias" in trained
    norm = copy.deepcopy(litemedsam)
    apply_adapters(norm, {"method": "norm"})
    assert {n for n, p in norm.named_parameters() if p.requires_grad} >= {"image_encoder.neck.1.weight"}
    with pytest.raises(ConfigError, match="vpt"):
        apply_adapters(copy.deepcopy(litemedsam), {"method": "vpt"})


def test_lora_merge_parity_on_real_weights(litemedsam):
    model = copy.deepcopy(litemedsam)
    apply_adapters(model, {"method": "dora", "rank": 4, "targets": ["qkv", "mlp"]})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        x = torch.rand(1, 1, 256, 256, generator=generator)
        adapted = model(x).features
        merge_adapters(model)
        merged = model(x).features
    assert (adapted - merged).abs().max() <= 1e-5
    assert adapted.abs().max() > 1e-2  # a real, non-degenerate output
