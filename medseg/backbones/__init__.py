"""Pretrained foundation-model backbones and their from-scratch twins behind one interface."""

from __future__ import annotations

from medseg.backbones import sam2  # noqa: F401  (registers the SAM 2 family; the sam2 package loads at build time)
from medseg.backbones.base import Backbone, BackboneOutput, ChannelAdapter, InputSpec
from medseg.backbones.registry import create_backbone, list_backbones

__all__ = ["Backbone", "BackboneOutput", "ChannelAdapter", "InputSpec", "create_backbone", "list_backbones"]
