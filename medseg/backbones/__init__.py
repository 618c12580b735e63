"""Pretrained foundation-model backbones and their from-scratch twins behind one interface."""

from __future__ import annotations

from medseg.backbones.base import Backbone, BackboneOutput, ChannelAdapter, InputSpec
from medseg.backbones.registry import create_backbone, list_backbones

__all__ = ["Backbone", "BackboneOutput", "ChannelAdapter", "InputSpec", "create_backbone", "list_backbones"]
