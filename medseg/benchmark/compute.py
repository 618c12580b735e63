"""Training compute of a benchmark arm: FLOPs of one optimisation step, counted by torch, and step budgets by compute.

Arms of a transfer study differ in how much work one step does (a frozen encoder with LoRA skips the weight gradients
of every frozen layer; a small UNet does a fraction of a ViT's work), so equal steps are not equal compute. The count
is :func:`medseg.workflows.nnunet.flops.step_flops` (torch's ``FlopCounterMode`` around one training step: the model's
forward on a batch of the arm's shape, then the backward of a scalar of its outputs) with the model moved to the
``meta`` device, so no arithmetic runs and a ViT is counted in about a second on a CPU. Matrix products and
convolutions are counted (forward and backward), element-wise work is not; frozen parameters get no weight gradient,
so LoRA's step is cheaper than full fine-tuning's, as in a real step. Activation checkpointing's recomputation is not
counted (it would add up to one forward).

Counted once per configuration (``init`` does not change the network, so pretrained and scratch arms share one count;
the network is built with ``backbone.pretrained=false`` so that no weights are needed). An nnU-Net arm's network is
planned by nnU-Net inside its run, so its count comes from its ``summary.json`` (``nnunet.train_flops_per_step``,
counted by its worker the same way), and is unknown beforehand: a compute-matched benchmark keeps its step budget.
Training FLOPs of a run are ``flops_per_step x steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from medseg.config import instantiate
from medseg.errors import ConfigError
from medseg.workflows.nnunet.flops import step_flops

__all__ = ["ArmCompute", "arm_compute", "batch_shape", "compute_matched_steps", "step_flops"]

NNUNET_NOTE = "nnU-Net plans its own network, batch and patch inside the run: counted by its worker (summary.json)"


@dataclass(frozen=True)
class ArmCompute:
    """FLOPs of one training step of an arm, or why they are unknown.

    Attributes:
        flops_per_step: forward + backward FLOPs of one optimisation step; ``None``: not counted here.
        note: how the number was obtained (the batch shape), or why it is unknown.
    """

    flops_per_step: float | None
    note: str


def batch_shape(cfg: DictConfig, spatial_dims: int, in_channels: int) -> tuple[int, ...]:
    """The training batch of a ``medseg train`` config: ``data.batch_size x data.sampling.num_samples`` images of
    ``data.sampling.size`` pixels (2-D slices) or ``data.sampling.patch_size`` voxels (3-D patches).

    Raises:
        ConfigError: the config has no sampling size for the model's dimensionality.
    """
    images = int(OmegaConf.select(cfg, "data.batch_size", default=1)) * int(
        OmegaConf.select(cfg, "data.sampling.num_samples", default=1) or 1
    )
    if spatial_dims == 2:
        size = OmegaConf.select(cfg, "data.sampling.size", default=None)
        spatial = (int(size), int(size)) if size is not None else None
    else:
        patch = OmegaConf.select(cfg, "data.sampling.patch_size", default=None)
        spatial = tuple(int(s) for s in patch) if patch is not None else None
    if spatial is None or len(spatial) != spatial_dims:
        raise ConfigError(
            f"a {spatial_dims}-D model needs data.sampling.{'size' if spatial_dims == 2 else 'patch_size'} to count "
            f"its training FLOPs."
        )
    return (images, int(in_channels), *spatial)


def _config_key(cfg: DictConfig, classes: int, channels: int) -> str:
    """What decides the count: the model and adapter settings, classes, channels and the batch's settings."""
    parts = [OmegaConf.to_yaml(cfg[key], resolve=True) for key in ("model", "adapter") if key in cfg]
    for key in ("data.batch_size", "data.sampling.num_samples", "data.sampling.size", "data.sampling.patch_size"):
        parts.append(f"{key}={OmegaConf.select(cfg, key, default=None)}")
    return "\n".join([*parts, f"classes={classes} channels={channels}"])


def arm_compute(cfg: DictConfig, cache: dict[str, ArmCompute] | None = None) -> ArmCompute:
    """Count one training step of the arm whose composed ``medseg train`` config is ``cfg`` (see the module doc).

    Args:
        cfg: the composed config (the runner's, one per arm); not modified.
        cache: counts by configuration (model, adapter, batch shape), shared between arms.

    Returns:
        The count, or ``flops_per_step=None`` with the reason (an nnU-Net arm; a model that does not run on the
        ``meta`` device or whose forward needs more than images, e.g. prompts).
    """
    if OmegaConf.select(cfg, "nnunet", default=None) is not None:
        return ArmCompute(None, NNUNET_NOTE)
    cfg = cfg.copy()
    if OmegaConf.select(cfg, "backbone.pretrained", default=None) is not None:
        OmegaConf.update(cfg, "backbone.pretrained", False)  # same network (conf/init/scratch.yaml), no weights read
    try:
        datamodule = instantiate(cfg.data)
        classes, channels = int(datamodule.num_classes), int(datamodule.num_channels)
        key = _config_key(cfg, classes, channels)
        if cache is not None and key in cache:
            return cache[key]
        model = instantiate(cfg.model, num_classes=classes, in_channels=channels)
        shape = batch_shape(cfg, int(getattr(model, "spatial_dims", 2)), channels)
        model = model.to("meta")
        flops = step_flops(model, torch.zeros(shape, device="meta"))
    except Exception as err:  # the count is a report column: an arm that cannot be counted still trains
        return ArmCompute(None, f"not counted: {type(err).__name__}: {' '.join(str(err).split())[:200]}")
    result = ArmCompute(float(flops), f"one step on a batch of {tuple(shape)}, forward + backward")
    if cache is not None:  # failures are not cached: the next arm says its own reason
        cache[key] = result
    return result


def compute_matched_steps(flops_per_step: float | None, budget_flops: float, default_steps: int) -> int:
    """Optimisation steps that spend ``budget_flops`` at ``flops_per_step`` (at least 1); ``default_steps`` when the
    arm's FLOPs are unknown."""
    if flops_per_step is None or not math.isfinite(flops_per_step) or flops_per_step <= 0:
        return int(default_steps)
    return max(1, round(budget_flops / flops_per_step))
