"""Segmentation models: pretrained backbones with adapters and dense decoders, and from-scratch MONAI baselines.

Every model satisfies :class:`SegmentationModel` (``forward``, ``param_groups``, ``trainable_report``) and is built by
one of two Hydra targets: :func:`build_segmenter` (2-D, ``conf/model/vit_*.yaml``, ``sam_mask.yaml``) and
:func:`build_baseline` (2-D or 3-D, ``conf/model/unet_*.yaml``, ``dynunet_3d.yaml``, ``swinunetr_3d.yaml``).
"""

from __future__ import annotations

from medseg.models.baselines import BASELINES, BaselineModel, build_baseline, plan_dynunet
from medseg.models.dense import LinearDecoder, UNETRDecoder, default_unetr_layers
from medseg.models.interface import SegmentationModel
from medseg.models.param_groups import backbone_layer_ids, make_param_groups
from medseg.models.sam_mask import SamMaskDecoder
from medseg.models.segmenter import DECODERS, Segmenter, build_segmenter

__all__ = [
    "BASELINES",
    "DECODERS",
    "BaselineModel",
    "LinearDecoder",
    "SamMaskDecoder",
    "SegmentationModel",
    "Segmenter",
    "UNETRDecoder",
    "backbone_layer_ids",
    "build_baseline",
    "build_segmenter",
    "default_unetr_layers",
    "make_param_groups",
    "plan_dynunet",
]
