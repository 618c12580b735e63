"""The one interface every backbone honours, whatever its family.

Decoders, adapters and classifiers only ever see :class:`Backbone`: a module that takes a batch of medical images
(any channel count, any size divisible by the patch size) and returns :class:`BackboneOutput`. Everything a
downstream stage needs to know about the backbone (embedding width, patch size, the input size and intensity
normalisation it was pretrained with) is on :class:`InputSpec` and the module attributes, so nothing reaches into a
family's internals.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from medseg.errors import ConfigError, InputShapeError

__all__ = ["Backbone", "BackboneOutput", "ChannelAdapter", "InputSpec"]


@dataclass(frozen=True)
class InputSpec:
    """How the pretrained weights expect their input.

    Attributes:
        image_size: side length in pixels the backbone was pretrained at (inputs of other sizes interpolate the
            position embeddings).
        in_chans: channels of the pretrained patch embedding (3 for RGB models).
        mean, std: per-channel normalisation applied *after* scaling intensities to ``value_range``.
        value_range: the intensity range the normaliser assumes, e.g. ``(0, 255)`` for SAM, ``(0, 1)`` for DINOv2.
    """

    image_size: int
    in_chans: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    value_range: tuple[float, float] = (0.0, 1.0)


@dataclass
class BackboneOutput:
    """Feature maps of one forward pass.

    Attributes:
        features: final feature map ``(B, C, H/p, W/p)``, after the family's own neck if it has one (SAM, TinyViT).
        intermediates: transformer-block outputs requested through ``layers=``, each ``(B, D, H/p, W/p)``, in the order
            requested (for UNETR-style decoders).
        cls_token: ``(B, D)`` class token where the family has one (DINOv2, MAE), else ``None``.
    """

    features: torch.Tensor
    intermediates: list[torch.Tensor] = field(default_factory=list)
    cls_token: torch.Tensor | None = None


class ChannelAdapter(nn.Module):
    """Maps a medical image with ``in_channels`` channels onto the ``out_channels`` the pretrained stem expects.

    ``mode="repeat"`` copies a single channel (or cycles several) and has no parameters, so a pretrained model sees
    exactly what it saw in pretraining. ``mode="project"`` is a learned 1x1 convolution, initialised to the average
    of the channels, for multi-channel inputs (T1/T2, CT/PET).
    """

    def __init__(self, in_channels: int, out_channels: int = 3, mode: str = "repeat") -> None:
        super().__init__()
        if mode not in {"repeat", "project"}:
            raise ConfigError(f"channel_mode must be 'repeat' or 'project', got {mode!r}.")
        self.in_channels, self.out_channels, self.mode = in_channels, out_channels, mode
        self.proj: nn.Conv2d | None = None
        if mode == "project" and in_channels != out_channels:
            self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)
            nn.init.constant_(self.proj.weight, 1.0 / in_channels)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise InputShapeError(
                f"expected {self.in_channels} input channels, got a tensor of shape {tuple(x.shape)}; set in_channels "
                f"to the dataset's channel count."
            )
        if self.in_channels == self.out_channels:
            return x
        if self.proj is not None:
            return self.proj(x)
        index = torch.arange(self.out_channels, device=x.device) % self.in_channels
        return x.index_select(1, index)


class Backbone(nn.Module, abc.ABC):
    """Base class: subclasses set the attributes below and implement :meth:`forward_features`.

    Attributes:
        name: registry name, e.g. ``"sam_vit_b"``.
        embed_dim: channels of ``BackboneOutput.features``.
        block_dim: channels of the transformer-block outputs returned as intermediates.
        patch_size: pixels per feature-map cell along each side (16 for SAM/MAE, 14 for DINOv2).
        num_blocks: number of transformer blocks that ``layers=`` can index.
        input_spec: the pretrained input convention.
        channel_adapter: applied to the input before the family's stem.
    """

    name: str
    embed_dim: int
    block_dim: int
    patch_size: int
    num_blocks: int
    input_spec: InputSpec

    def __init__(self, in_channels: int = 1, channel_mode: str = "repeat", pretrained_in_chans: int = 3) -> None:
        super().__init__()
        self.channel_adapter = ChannelAdapter(in_channels, pretrained_in_chans, channel_mode)

    @abc.abstractmethod
    def forward_features(self, x: torch.Tensor, layers: Sequence[int] = ()) -> BackboneOutput:
        """Run the family's network on an input with ``input_spec.in_chans`` channels, already standardised."""

    def forward(self, x: torch.Tensor, layers: Sequence[int] = ()) -> BackboneOutput:
        """Args:
        x: ``(B, in_channels, H, W)`` in ``input_spec.value_range`` (:meth:`normalise` maps [0, 1] there); H and W
            divisible by ``patch_size``.
        layers: indices of transformer blocks whose outputs to return (negative indices count from the end).
        """
        return self.forward_features(self.standardise(self.channel_adapter(x)), layers)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Scale an image in [0, 1] to the pretrained ``value_range`` (e.g. 0-255 for SAM).

        The per-channel ``mean``/``std`` step comes later, in :meth:`forward`, after the channel adapter: a grey
        image repeated onto RGB must get each channel's own statistics, exactly as the pretrained model saw a grey
        photograph, and that is only possible once it has three channels.
        """
        lo, hi = self.input_spec.value_range
        return x * (hi - lo) + lo

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Subtract the pretrained per-channel ``mean`` and divide by ``std`` (``x`` has ``in_chans`` channels)."""
        mean = torch.tensor(self.input_spec.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.input_spec.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std
