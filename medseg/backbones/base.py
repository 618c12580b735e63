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

from medseg.backbones.attention import set_attention
from medseg.backbones.compute import BlockRunner, checkpoint_interval
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

    Compute settings shared by every family (see :mod:`medseg.backbones.compute` and
    :mod:`medseg.backbones.attention`): :meth:`set_attention` (``fused``/``reference``),
    :meth:`set_activation_checkpointing` (``none``/``all``/every ``k``-th block), and ``frozen_dtype``, set by an
    adapter config with ``frozen_dtype: bf16`` when the frozen weights are kept in bfloat16.

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
    #: Blocks between two checkpointed ones in training (0: no activation checkpointing).
    checkpoint_every: int = 0
    #: dtype the frozen linear/convolution weights are kept in (``None``: the parameters' own, float32).
    frozen_dtype: torch.dtype | None = None

    def __init__(self, in_channels: int = 1, channel_mode: str = "repeat", pretrained_in_chans: int = 3) -> None:
        super().__init__()
        self.channel_adapter = ChannelAdapter(in_channels, pretrained_in_chans, channel_mode)

    @abc.abstractmethod
    def compute_blocks(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """``(blocks in forward order, modules after the last block)``: what checkpointing and the prefix act on."""

    def set_activation_checkpointing(self, spec: bool | int | str | None) -> None:
        """Recompute block activations in backward: ``none``, ``all``, or every ``k``-th block (an integer).

        Saves the activation memory of the checkpointed blocks for one more forward of each in backward; losses and
        gradients are unchanged. Only acts in training mode with gradients enabled.
        """
        every = checkpoint_interval(spec)
        if every > self.num_blocks:
            raise ConfigError(
                f"activation_checkpointing={spec!r} is larger than the {self.num_blocks} blocks of "
                f"{getattr(self, 'name', type(self).__name__)!r}; "
                f"use all, none or an interval of at most {self.num_blocks}."
            )
        self.checkpoint_every = every

    def set_grad_checkpointing(self, enable: bool | int | str = True) -> None:
        """Alias of :meth:`set_activation_checkpointing` (``True``: all blocks), timm's and the model configs' name."""
        self.set_activation_checkpointing(enable)

    @property
    def grad_checkpointing(self) -> bool:
        """Whether any block is checkpointed in training."""
        return self.checkpoint_every > 0

    def set_attention(self, mode: str) -> int:
        """``fused`` (SDPA kernels) or ``reference`` (the family's own attention code); returns modules switched."""
        return set_attention(self, mode)

    def block_runner(self, x: torch.Tensor) -> BlockRunner:
        """The :class:`~medseg.backbones.compute.BlockRunner` of one forward whose stem input is ``x``."""
        blocks, heads = self.compute_blocks()
        return BlockRunner(self, blocks, heads, x)

    @abc.abstractmethod
    def forward_features(self, x: torch.Tensor, layers: Sequence[int] = ()) -> BackboneOutput:
        """Run the family's network on an input with ``input_spec.in_chans`` channels, already standardised."""

    def forward(self, x: torch.Tensor, layers: Sequence[int] = ()) -> BackboneOutput:
        """Args:
        x: ``(B, in_channels, H, W)`` in ``input_spec.value_range`` (:meth:`normalise` maps [0, 1] there); H and W
            divisible by ``patch_size``.
        layers: indices of transformer blocks whose outputs to return (negative indices count from the end).
        """
        dtype = self.frozen_dtype
        if dtype is None or torch.is_autocast_enabled(x.device.type):
            return self.forward_features(self.standardise(self.channel_adapter(x)), layers)
        # Frozen weights kept in bfloat16 only compute under autocast; a float32 caller (CPU inference, a fp32
        # trainer) gets it here and float32 outputs back, instead of a dtype error deep inside a layer.
        with torch.autocast(x.device.type, dtype=dtype):
            out = self.forward_features(self.standardise(self.channel_adapter(x)), layers)
        return BackboneOutput(
            features=out.features.to(x.dtype),
            intermediates=[t.to(x.dtype) for t in out.intermediates],
            cls_token=None if out.cls_token is None else out.cls_token.to(x.dtype),
        )

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
