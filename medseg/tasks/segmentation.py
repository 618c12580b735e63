"""Dense multi-class segmentation as a LightningModule: Dice + cross-entropy, parameter groups, full-volume validation.

Training sees what the data pipeline samples (2D slices or 3D patches). Validation does not: it predicts every whole
validation volume the way evaluation does (slice by slice or sliding window, :func:`medseg.inference.predict_logits`)
and scores Dice per class on the *preprocessed* grid. That number is good for choosing a checkpoint but is not the
reported result, so it is logged as ``val/dice_resampled``; the reported metrics come from :mod:`medseg.evaluate`, on
the native grid of the test cases.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medseg.errors import ConfigError

__all__ = ["SegmentationTask", "total_steps_keyword"]

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


class SegmentationTask(L.LightningModule):
    """Trains a :class:`~medseg.models.interface.SegmentationModel` with a segmentation loss.

    Args:
        model: the network; ``param_groups()`` decides the learning rate of each parameter (backbone, adapters,
            decoder, layer-wise decay). A plain ``nn.Module`` trains all its trainable parameters at one rate.
        loss: ``loss(logits (B,K,*), labels (B,1,*))``, e.g. MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        optimizer: partial optimiser (``_partial_: true``); its ``lr`` and ``weight_decay`` are the base values.
        scheduler: partial scheduler stepped every optimisation step, or ``None``. ``total_iters``/``T_max`` is
            filled with the run's number of steps when the config leaves it out.
        backbone_lr_scale: learning-rate factor of the (pretrained) backbone parameters.
        layer_decay: layer-wise learning-rate decay in (0, 1], or ``None``.
        inference: ``roi_size``, ``sw_batch_size``, ``overlap``, ``slice_axis`` for whole-volume prediction.
        label_names: ``{name: value}`` of the dataset, background included (for per-class metric names).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        backbone_lr_scale: float = 0.1,
        layer_decay: float | None = None,
        inference: Mapping[str, Any] | None = None,
        label_names: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        # Plain containers only: checkpoints must load with torch.load(weights_only=True) on resume.
        inference = OmegaConf.to_container(inference, resolve=True) if isinstance(inference, DictConfig) else inference
        self.save_hyperparameters(
            {"backbone_lr_scale": backbone_lr_scale, "layer_decay": layer_decay, "inference": dict(inference or {})}
        )
        self.model = model
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone_lr_scale = backbone_lr_scale
        self.layer_decay = layer_decay
        self.inference = dict(inference or {})
        self.num_classes = int(model.num_classes)
        names = {int(v): str(k) for k, v in (label_names or {}).items()}
        self.class_names = [names.get(k, f"class_{k}") for k in range(1, self.num_classes)]
        self._dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self._val_sum = torch.zeros(0)
        self._val_count = torch.zeros(0)

    # ------------------------------------------------------------------ training
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        image, label = batch["image"], batch["label"]
        logits = self.model(image)
        loss = self.loss(logits.float(), label)
        self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0], sync_dist=False)
        return loss

    # ------------------------------------------------------------------ validation (whole volumes)
    def predict_volume(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(K, X, Y, Z)`` of one preprocessed volume ``(C, X, Y, Z)``, as evaluation predicts it."""
        from medseg.inference import predict_logits

        return predict_logits(self.model, image, spatial_dims=int(self.model.spatial_dims), **self.inference)

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(self.num_classes - 1, dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros(self.num_classes - 1, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        image, label = batch["image"], batch["label"]
        if image.shape[0] != 1:
            raise ConfigError("validation predicts whole volumes one at a time: the val dataloader must use batch 1.")
        logits = self.predict_volume(image[0])
        pred = one_hot(logits.argmax(0, keepdim=True)[None], self.num_classes)
        ref = one_hot(label.long(), self.num_classes)
        dice = self._dice(pred.to(ref.device), ref)[0].to(self._val_sum)  # (K-1,), NaN where both are empty
        seen = ~torch.isnan(dice)
        self._val_sum += torch.where(seen, dice, torch.zeros_like(dice))
        self._val_count += seen.to(self._val_count)

    def on_validation_epoch_end(self) -> None:
        # Sums and counts over all ranks, so DDP reports the Dice of all validation cases, not of one shard.
        total = self.all_gather(self._val_sum).reshape(-1, self.num_classes - 1).sum(0)
        count = self.all_gather(self._val_count).reshape(-1, self.num_classes - 1).sum(0)
        per_class = total / count.clamp(min=1)
        valid = count > 0
        mean = per_class[valid].mean() if bool(valid.any()) else torch.tensor(math.nan)
        self.log("val/dice_resampled", mean.float(), prog_bar=True, sync_dist=False, rank_zero_only=False)
        for name, value, ok in zip(self.class_names, per_class, valid):
            if ok:
                self.log(f"val/dice_resampled/{name}", value.float(), sync_dist=False)

    # ------------------------------------------------------------------ optimisation
    def _base(self, key: str, default: float | None) -> float | None:
        keywords = getattr(self.optimizer_factory, "keywords", {}) or {}
        return keywords.get(key, default)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups from the model's ``param_groups`` (or one group of all trainable parameters)."""
        lr = self._base("lr", None)
        if lr is None:
            raise ConfigError("task.optimizer needs an `lr` (the base learning rate of decoder and adapters).")
        weight_decay = self._base("weight_decay", 0.0) or 0.0
        if hasattr(self.model, "param_groups"):
            groups = self.model.param_groups(
                lr=lr, backbone_lr_scale=self.backbone_lr_scale, layer_decay=self.layer_decay, weight_decay=weight_decay
            )
        else:
            groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "name": "all"}]
        if not any(len(g["params"]) for g in groups):
            raise ConfigError("the model has no trainable parameter: check the adapter config (adapter=...).")
        return groups

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
        """The model's own report, or trainable/total counts for a plain module."""
        if hasattr(self.model, "trainable_report"):
            return dict(self.model.trainable_report())
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / max(total, 1)}
