"""SAM-style components (image encoder, prompt encoder, mask decoder) of either family, by backbone name.

SAM (``segment_anything``) and LiteMedSAM (TinyViT with SAM's prompt encoder and mask decoder) load from different
official files. LiteMedSAM reuses SAM's module types, so :mod:`medseg.backbones.litemedsam` imports
:mod:`medseg.backbones.sam`; choosing between them by name lives here, above both, so that the two never import each
other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medseg.backbones.litemedsam import LITEMEDSAM_IMAGE_SIZE, build_litemedsam_components
from medseg.backbones.registry import get_entry
from medseg.backbones.sam import SamComponents, build_sam_components

__all__ = ["build_components"]


def build_components(
    name: str,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    *,
    img_size: int | None = None,
    arch: Mapping[str, Any] | None = None,
    attention: str = "fused",
) -> SamComponents:
    """Image encoder, prompt encoder and mask decoder of ``name`` (``sam_vit_b/l/h`` or ``litemedsam``).

    Args and loading are those of :func:`~medseg.backbones.sam.build_sam_components`; LiteMedSAM has one
    architecture at 256 px, so ``img_size`` (other than 256) and ``arch`` are refused for it.
    """
    if get_entry(name).family == "litemedsam":
        if arch or img_size not in (None, LITEMEDSAM_IMAGE_SIZE):
            raise ValueError(f"LiteMedSAM has one architecture at {LITEMEDSAM_IMAGE_SIZE} px: no img_size or arch")
        return build_litemedsam_components(pretrained, checkpoint, attention=attention)
    return build_sam_components(name, pretrained, checkpoint, img_size=img_size, arch=arch, attention=attention)
