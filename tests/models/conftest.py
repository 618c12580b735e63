"""Tiny architectures shared by the model tests (a few hundred thousand parameters, milliseconds per forward)."""

from __future__ import annotations

import pytest
import torch

from medseg.models import build_segmenter

# SAM: 4 blocks of width 32, blocks 1 and 3 global; built for 64 x 64 inputs (4 x 4 tokens of 16 px).
SAM = {"depth": 4, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1, 3)}
# timm ViTs: 4 blocks of width 32; the position-embedding grid is img_size / patch.
DINOV2 = {"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 56}  # 4 x 4 grid of 14 px patches
MAE = {"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 64}  # 4 x 4 grid of 16 px patches

TINY = {"sam_vit_b": (SAM, 64), "dinov2_vits14": (DINOV2, 56), "mae_vit_base": (MAE, 64)}


def tiny_segmenter(backbone: str, decoder: str, num_classes: int = 3, in_channels: int = 1, **kwargs):
    """A scratch segmenter on the tiny variant of ``backbone`` at its tiny size."""
    arch, size = TINY[backbone]
    kwargs.setdefault("img_size", size)
    if decoder == "unetr":
        kwargs.setdefault("feature_size", 8)
    torch.manual_seed(0)
    return build_segmenter(backbone, False, None, decoder, num_classes, in_channels, arch=arch, **kwargs)


@pytest.fixture(name="tiny_segmenter")
def _tiny_segmenter_fixture():
    """The :func:`tiny_segmenter` factory."""
    return tiny_segmenter
