"""From-scratch baselines: MONAI's ``UNet``, ``DynUNet`` (planned as nnU-Net plans it) and ``SwinUNETR``, 2-D or 3-D.

They are the reference every adapted foundation model must beat, so they are built the way their authors recommend:

* ``dynunet``: kernels and strides from the patch size and voxel spacing by nnU-Net v2's rule
  (:func:`plan_dynunet`, after ``nnunetv2.experiment_planning...network_topology.get_pool_and_conv_props``):
  an axis is downsampled only while its spacing is within a factor 2 of the finest one and its feature map stays
  at least ``2 * min_feature_map_size`` voxels, and its kernel is 1 until then, so an anisotropic CT volume
  (0.8 x 0.8 x 3 mm) is first pooled in-plane only. Features ``min(32 * 2**i, 320)`` (2-D: 512), instance norm,
  leaky ReLU. Deep supervision is off: the training loss takes one output.
* ``unet``: MONAI ``UNet`` with residual units and instance norm, four stride-2 levels.
* ``swinunetr``: MONAI ``SwinUNETR`` (feature size 48 as in the paper), whose inputs must be multiples of 32.

Inputs of any size are zero-padded at the end to the multiple the network needs and the logits are cropped back, so
the output always has the input's size. Intensities are used as the data pipeline gives them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError, InputShapeError
from medseg.models.param_groups import count_report, make_param_groups

__all__ = ["BASELINES", "BaselineModel", "DynUNetPlan", "build_baseline", "plan_dynunet"]

BASELINES = ("unet", "dynunet", "swinunetr")


class DynUNetPlan(dict):
    """``kernel_size``, ``strides``, ``upsample_kernel_size`` and ``filters`` for ``monai.networks.nets.DynUNet``."""


def plan_dynunet(
    patch_size: Sequence[int],
    spacing: Sequence[float] | None = None,
    min_feature_map_size: int = 4,
    max_features: int | None = None,
    base_features: int = 32,
) -> DynUNetPlan:
    """Plan DynUNet's topology as nnU-Net v2 does (``get_pool_and_conv_props``).

    Args:
        patch_size: training patch in voxels per axis (2 or 3 axes).
        spacing: voxel spacing in mm per axis, same order; ``None`` is isotropic.
        min_feature_map_size: smallest feature-map side (voxels) at the bottleneck (nnU-Net: 4).
        max_features: channel cap (nnU-Net: 320 in 3-D, 512 in 2-D).
        base_features: channels of the first stage (nnU-Net: 32).

    Returns:
        A :class:`DynUNetPlan`; ``strides[0]`` is all ones (the first stage keeps full resolution) and the last
        kernel (the bottleneck) is 3 on every axis.
    """
    dim = len(patch_size)
    if dim not in (2, 3):
        raise ConfigError(f"patch_size must have 2 or 3 axes, got {list(patch_size)}")
    spacing = [1.0] * dim if spacing is None else [float(s) for s in spacing]
    if len(spacing) != dim:
        raise ConfigError(f"spacing {spacing} and patch_size {list(patch_size)} must have the same number of axes")
    size, current = [float(s) for s in patch_size], list(spacing)
    kernel = [1] * dim
    strides, kernels = [[1] * dim], []
    while True:
        valid = [i for i in range(dim) if size[i] >= 2 * min_feature_map_size]
        if not valid:
            break
        finest = min(current[i] for i in valid)
        valid = [i for i in valid if current[i] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * min_feature_map_size:
            break
        if not valid:
            break
        for axis in range(dim):  # a kernel becomes 3 once its axis is within a factor 2 of the finest spacing
            if kernel[axis] != 3 and current[axis] / min(current) < 2:
                kernel[axis] = 3
        stride = [2 if i in valid else 1 for i in range(dim)]
        for i in valid:
            current[i] *= 2
            size[i] = math.ceil(size[i] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    cap = max_features or (320 if dim == 3 else 512)
    return DynUNetPlan(
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=[min(base_features * 2**i, cap) for i in range(len(strides))],
    )


class BaselineModel(nn.Module):
    """A MONAI network behind the :class:`~medseg.models.interface.SegmentationModel` interface.

    Attributes:
        net: the MONAI network.
        divisor: per-axis multiple (voxels) the network needs; inputs are padded to it and logits cropped back.
    """

    def __init__(
        self, net: nn.Module, spatial_dims: int, in_channels: int, num_classes: int, divisor: Sequence[int]
    ) -> None:
        super().__init__()
        self.net = net
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.divisor = tuple(int(d) for d in divisor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, *spatial)`` for ``image`` ``(B, in_channels, *spatial)`` of any size."""
        if image.ndim != self.spatial_dims + 2 or image.shape[1] != self.in_channels:
            raise InputShapeError(
                f"{type(self.net).__name__} ({self.spatial_dims}-D) takes (B, {self.in_channels}, "
                f"{', '.join('XYZ'[: self.spatial_dims])}) inputs, got {tuple(image.shape)}"
            )
        spatial = image.shape[2:]
        extra = [(-s) % d for s, d in zip(spatial, self.divisor)]
        if any(extra):
            pad = [p for e in reversed(extra) for p in (0, e)]  # F.pad: last axis first
            image = F.pad(image, pad)
        logits = self.net(image)
        if any(extra):
            logits = logits[(..., *(slice(0, s) for s in spatial))]
        return logits

    def param_groups(
        self,
        lr: float,
        backbone_lr_scale: float = 0.1,
        layer_decay: float | None = None,
        weight_decay: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Every trainable parameter at ``lr`` (no pretrained part: ``backbone_lr_scale`` and ``layer_decay`` do not
        apply); weight decay on kernels only, not on biases and norms."""
        del backbone_lr_scale, layer_decay
        return make_param_groups({"decoder": self.net.named_parameters()}, lr=lr, weight_decay=weight_decay)

    def trainable_report(self) -> dict[str, Any]:
        """Parameter counts in the layout of the segmenters' report; the whole network counts as ``decoder``."""
        return count_report({"backbone": [], "adapters": [], "decoder": self.net.parameters()})


def _check_patch(patch_size: Sequence[int] | None, spatial_dims: int) -> list[int] | None:
    if patch_size is None:
        return None
    patch = [int(p) for p in (patch_size if isinstance(patch_size, Sequence) else [patch_size] * spatial_dims)]
    if len(patch) != spatial_dims:
        raise ConfigError(f"patch_size {patch} has {len(patch)} axes but spatial_dims={spatial_dims}")
    return patch


def build_baseline(
    name: str,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    patch_size: Sequence[int] | int | None = None,
    spacing: Sequence[float] | None = None,
    **kwargs: Any,
) -> BaselineModel:
    """Build a from-scratch MONAI baseline.

    Args:
        name: ``unet``, ``dynunet`` or ``swinunetr``.
        spatial_dims: 2 (slices) or 3 (patches).
        in_channels: image channels (from the data module).
        num_classes: output channels, background included (from the data module).
        patch_size: training patch / slice size in voxels; required by ``dynunet`` (it plans the topology).
        spacing: voxel spacing in mm (``dynunet``; ``None``: isotropic). A string such as ``"median"`` (the
            preprocessing's placeholder) is rejected: pass the numbers.
        **kwargs: the MONAI network's own arguments, overriding the defaults above (``channels``, ``strides``,
            ``feature_size``, ``use_checkpoint``, ``filters``...); for ``dynunet`` also ``min_feature_map_size``.
    """
    from monai.networks.nets import DynUNet, SwinUNETR, UNet  # lazy: seconds to import, only baselines need them

    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    patch = _check_patch(patch_size, spatial_dims)
    try:
        if name == "unet":
            options = {"channels": (32, 64, 128, 256, 320), "strides": (2, 2, 2, 2), "num_res_units": 2}
            options.update({"norm": "instance", **kwargs})
            net = UNet(spatial_dims, in_channels, num_classes, **options)
            divisor = [
                math.prod(s if isinstance(s, int) else s[i] for s in options["strides"]) for i in range(spatial_dims)
            ]
        elif name == "dynunet":
            if patch is None:
                raise ConfigError("dynunet plans its kernels and strides from the patch: set model.patch_size")
            if isinstance(spacing, str):
                raise ConfigError(
                    f"dynunet needs the voxel spacing in mm, got {spacing!r}; set model.spacing to numbers "
                    f"(e.g. the dataset's median spacing), or null for isotropic data."
                )
            if kwargs.get("deep_supervision"):
                raise ConfigError("dynunet: deep_supervision is not supported (the loss takes one output)")
            plan = plan_dynunet(patch, spacing, kwargs.pop("min_feature_map_size", 4))
            plan.update({"norm_name": ("INSTANCE", {"affine": True}), **kwargs})
            net = DynUNet(spatial_dims, in_channels, num_classes, **plan)
            divisor = [math.prod(s[i] for s in plan["strides"]) for i in range(spatial_dims)]
        elif name == "swinunetr":
            if patch is not None and min(patch) <= 32:
                raise ConfigError(
                    f"swinunetr reduces its input 32-fold and instance-normalises the 1-voxel bottleneck of a patch of "
                    f"32 or fewer voxels, which fails in training; use a patch of more than 32 voxels per axis "
                    f"(got {patch})."
                )
            options = {"feature_size": 48, **kwargs}
            net = SwinUNETR(in_channels=in_channels, out_channels=num_classes, spatial_dims=spatial_dims, **options)
            divisor = [32] * spatial_dims
        else:
            raise ConfigError(f"Unknown baseline {name!r}. Available: {', '.join(BASELINES)}.")
    except TypeError as err:
        raise ConfigError(f"baseline {name!r}: {err}") from err
    return BaselineModel(net, spatial_dims, in_channels, num_classes, divisor)
