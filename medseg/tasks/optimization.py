"""How every task optimises its model: parameter groups, optimiser and per-step scheduler from the config.

Shared by :class:`~medseg.tasks.segmentation.SegmentationTask` and :class:`~medseg.tasks.promptable.PromptableTask`,
so that a dense and a promptable run of the same backbone and adapter get the same learning rates for the same
parameters: decoder and adapters at ``lr``, the (pretrained) backbone at ``lr * backbone_lr_scale``, optionally with
layer-wise decay (:mod:`medseg.models.param_groups`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medseg.adapters.report import parameter_report
from medseg.adapters.targets import is_adapter_name
from medseg.errors import ConfigError
from medseg.models.param_groups import make_param_groups

__all__ = ["OptimizationMixin", "total_steps_keyword"]

# Scheduler arguments that mean "length of the schedule in steps"; filled from the trainer when the config omits them.
_LENGTH_KEYWORDS = ("total_iters", "T_max", "total_steps", "num_training_steps")


def total_steps_keyword(factory: Callable[..., Any]) -> str | None:
    """The scheduler argument that takes the schedule's length in steps, if the partial leaves it unset."""
    target = getattr(factory, "func", factory)
    given = getattr(factory, "keywords", {}) or {}
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    for name in _LENGTH_KEYWORDS:
        if name in parameters and name not in given:
            return name
    return None


class OptimizationMixin:
    """``configure_optimizers``, ``parameter_groups`` and ``trainable_report`` of a LightningModule.

    The host class sets ``model``, ``optimizer_factory`` (a partial optimiser whose ``lr`` and ``weight_decay`` are the
    base values), ``scheduler_factory`` (a partial scheduler or ``None``), ``backbone_lr_scale`` and ``layer_decay``.
    """

    model: nn.Module
    optimizer_factory: Callable[..., torch.optim.Optimizer]
    scheduler_factory: Callable[..., Any] | None
    backbone_lr_scale: float
    layer_decay: float | None

    def _base(self, key: str, default: float | None) -> float | None:
        keywords = getattr(self.optimizer_factory, "keywords", {}) or {}
        return keywords.get(key, default)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups: the model's own ``param_groups``; else, for a model with a ``backbone`` (the promptable
        models), the backbone at ``lr * backbone_lr_scale`` (adapters at ``lr``) and everything else at ``lr``; else
        one group of all trainable parameters."""
        lr = self._base("lr", None)
        if lr is None:
            raise ConfigError("task.optimizer needs an `lr` (the base learning rate of decoder and adapters).")
        weight_decay = self._base("weight_decay", 0.0) or 0.0
        if hasattr(self.model, "param_groups"):
            groups = self.model.param_groups(
                lr=lr, backbone_lr_scale=self.backbone_lr_scale, layer_decay=self.layer_decay, weight_decay=weight_decay
            )
        elif isinstance(getattr(self.model, "backbone", None), nn.Module):
            groups = self._backbone_groups(lr, weight_decay)
        else:
            groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "name": "all"}]
        if not any(len(g["params"]) for g in groups):
            raise ConfigError("the model has no trainable parameter: check the adapter config (adapter=...).")
        return groups

    def _backbone_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        backbone = self.model.backbone
        inside = {id(p) for p in backbone.parameters()}
        rest = [(n, p) for n, p in self.model.named_parameters() if id(p) not in inside]
        adapters = set(getattr(self.model, "adapter_names", ())) | {
            n for n, _ in backbone.named_parameters() if is_adapter_name(n)
        }
        return make_param_groups(
            {"backbone": backbone.named_parameters(), "decoder": rest}, lr=lr, backbone=backbone,
            adapter_names=adapters, backbone_lr_scale=self.backbone_lr_scale, layer_decay=self.layer_decay,
            weight_decay=weight_decay,
        )  # fmt: skip

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        keyword = total_steps_keyword(self.scheduler_factory)
        # The run's length fills the schedule's length unless the config sets it (an explicit value must win, or a
        # run cut short and resumed would follow a different schedule).
        if keyword is not None and keyword not in getattr(self.scheduler_factory, "keywords", {}):
            kwargs[keyword] = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def trainable_report(self) -> dict[str, Any]:
        """The model's own report, the adapter report for a model with a backbone, or trainable/total counts."""
        if hasattr(self.model, "trainable_report"):
            return dict(self.model.trainable_report())
        if isinstance(getattr(self.model, "backbone", None), nn.Module):
            return parameter_report(self.model)
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / max(total, 1)}
