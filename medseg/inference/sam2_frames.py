"""A volume's slices as SAM 2 video frames: preparation, image features on demand, and which models are SAM 2.

SAM 2's video predictor reads a folder of JPEG frames; a volume's slices are those frames here, prepared in memory
the way ``sam2`` prepares its inputs so that no file is written:

1. intensities to [0, 1] once for the whole volume (:func:`unit_volume`): a CT window or MR percentiles to 0-255
   first (the slice recipe of :mod:`medseg.inference.recipe`, MedSAM2's own preprocessing), then ``/ 255``; data a
   run's transforms already prepared (``intensity="none"``) are min-max scaled over the whole volume. One scale for
   every slice matters for memory: a per-slice min-max would change an object's contrast from slice to slice;
2. each slice resized to the model's square input (``image_size``; the aspect ratio is not kept, as
   ``SAM2Transforms`` and ``load_video_frames`` do) bilinearly with antialiasing (``torchvision``'s ``Resize``
   on tensors, what ``SAM2ImagePredictor`` runs), repeated onto RGB and normalised with the ImageNet statistics;
3. :meth:`SAM2Base.forward_image` and ``_prepare_backbone_features`` give the flattened features ``track_step``
   reads, exactly as ``SAM2VideoPredictor._get_image_feature`` makes them. A fine-tuned model that holds its image
   encoder as a :class:`~medseg.backbones.sam2.Sam2Backbone` (``model.backbone``, where its adapters sit) is encoded
   through that backbone instead (:meth:`~medseg.backbones.sam2.Sam2Backbone.encode`: the same channel repeat and
   ImageNet statistics), followed by the same ``conv_s0``/``conv_s1`` projections ``forward_image`` applies, so an
   adapter that acts in the backbone's forward pass is not bypassed.

:class:`Sam2Frames` keeps the features of recently used slices (a byte budget, least recently used dropped first) and
encodes ``batch_size`` slices at a time in the walking direction, so a propagation runs the encoder once per slice and
a correction that re-walks part of the volume reuses what is still held. The position encodings are the same for
every frame and are kept once.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.backbones.sam2 import IMAGENET_MEAN, IMAGENET_STD, Sam2Backbone
from medseg.errors import ConfigError
from medseg.inference.recipe import SliceRecipe, to_uint8

__all__ = ["Sam2Frames", "is_sam2_model", "sam2_of", "unit_volume"]

_DEFAULT_BYTES = 1 << 30


def sam2_of(model: nn.Module | None) -> nn.Module | None:
    """The ``SAM2Base`` a model is or holds (attribute ``sam2``, the fine-tuned promptable model), else ``None``.

    ``sam2`` is looked up among the loaded modules, never imported here: a model cannot be one without it.
    """
    base = getattr(sys.modules.get("sam2.modeling.sam2_base"), "SAM2Base", None)
    if base is None or model is None:
        return None
    if isinstance(model, base):
        return model
    inner = getattr(model, "sam2", None)
    return inner if isinstance(inner, base) else None


def is_sam2_model(model: nn.Module | None) -> bool:
    """Whether ``model`` segments with SAM 2's memory (an official SAM 2 / MedSAM2 model or a fine-tuned run of it)."""
    return sam2_of(model) is not None


def unit_volume(volume: np.ndarray, recipe: SliceRecipe) -> np.ndarray:
    """Step 1 of the module docstring: the whole volume in [0, 1] as float32."""
    volume = np.asarray(volume)
    if recipe.intensity == "none":
        volume = volume.astype(np.float32)
        lo, hi = float(volume.min()), float(volume.max())
        return (volume - lo) / max(hi - lo, 1e-8)
    return to_uint8(volume, recipe, recipe.bounds(volume)).astype(np.float32) / 255.0


class Sam2Frames:
    """The slices of one volume along an axis as SAM 2 frames, encoded on demand (module docstring).

    Attributes:
        model: the ``SAM2Base``.
        slices: ``(D, H, W)`` float32 slices in [0, 1] (:func:`unit_volume`, slice axis first).
        encoded: slices run through the image encoder so far.
    """

    def __init__(
        self, model: nn.Module, slices: np.ndarray, batch_size: int = 1, max_bytes: int = _DEFAULT_BYTES
    ) -> None:
        sam2 = sam2_of(model)
        if sam2 is None:
            raise ConfigError(f"{type(model).__name__} is not a SAM 2 model (SAM2Base, or a model with .sam2).")
        slices = np.asarray(slices, dtype=np.float32)
        if slices.ndim != 3:
            raise ConfigError(f"SAM 2 frames come from a 3-D volume (slices, H, W); got shape {slices.shape}.")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1 slice, got {batch_size}.")
        self.model, self.slices, self.batch_size, self.max_bytes = sam2, slices, int(batch_size), int(max_bytes)
        backbone = getattr(model, "backbone", None)
        self.backbone = backbone if isinstance(backbone, Sam2Backbone) and sam2 is not model else None
        self.encoded = 0
        self._features: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self._pos: list[torch.Tensor] | None = None
        self._sizes: list[tuple[int, int]] | None = None
        self._bytes = 0

    @property
    def depth(self) -> int:
        return int(self.slices.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of a slice."""
        return int(self.slices.shape[1]), int(self.slices.shape[2])

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def unit_images(self, indices: Sequence[int]) -> torch.Tensor:
        """Slices ``indices`` resized to the model's square input: ``(N, 1, S, S)`` in [0, 1]."""
        x = torch.from_numpy(self.slices[list(indices)])[:, None].to(self.device)
        size = self.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        """Step 2 of the module docstring: ``(N, 3, S, S)`` normalised model inputs of slices ``indices``."""
        x = self.unit_images(indices)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x.expand(-1, 3, -1, -1) - mean) / std

    def _encode(self, indices: Sequence[int]) -> dict[str, Any]:
        if self.backbone is None:
            return self.model.forward_image(self.images(indices))
        x = self.unit_images(indices).expand(-1, self.backbone.channel_adapter.in_channels, -1, -1)
        out = self.backbone.encode(x)
        fpn = list(out["backbone_fpn"])
        if self.model.use_high_res_features_in_sam:  # what SAM2Base.forward_image adds to its encoder's output
            fpn[0], fpn[1] = self.model.sam_mask_decoder.conv_s0(fpn[0]), self.model.sam_mask_decoder.conv_s1(fpn[1])
        return {**out, "backbone_fpn": fpn}

    def is_encoded(self, index: int) -> bool:
        return index in self._features

    def ensure(self, indices: Sequence[int]) -> None:
        """Encode the slices of ``indices`` not held yet, in one encoder call."""
        missing = [int(k) for k in dict.fromkeys(indices) if 0 <= k < self.depth and k not in self._features]
        if not missing:
            return
        out = self._encode(missing)
        _, feats, pos, sizes = self.model._prepare_backbone_features(out)  # (HW)NC per level
        if self._pos is None:
            self._pos, self._sizes = [p[:, :1] for p in pos], sizes
        for n, k in enumerate(missing):
            levels = [f[:, n : n + 1] for f in feats]
            self._features[k] = levels
            self._bytes += sum(t.numel() * t.element_size() for t in levels)
        self.encoded += len(missing)
        while self._bytes > self.max_bytes and len(self._features) > len(missing):
            _, dropped = self._features.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in dropped)

    def features(self, index: int, step: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Any]]:
        """``(vision_feats, vision_pos_embeds, feat_sizes)`` of slice ``index`` for ``track_step``; a miss encodes it
        and the next ``batch_size - 1`` slices in direction ``step``."""
        if not 0 <= index < self.depth:
            raise ConfigError(f"slice {index} is outside 0..{self.depth - 1}.")
        if index not in self._features:
            self.ensure(range(index, index + step * self.batch_size, step))
        self._features.move_to_end(index)
        return self._features[index], self._pos, self._sizes
