"""Dense multi-class segmentation as a LightningModule: Dice + cross-entropy, parameter groups, full-volume validation.

Training sees what the data pipeline samples (2D slices or 3D patches). Validation does not: it predicts every whole
validation volume the way evaluation does (slice by slice or sliding window, :func:`medseg.inference.predict_logits`)
and scores Dice per class on the *preprocessed* grid. That number is good for choosing a checkpoint but is not the
reported result, so it is logged as ``val/dice_resampled``; the reported metrics come from
:mod:`medseg.workflows.evaluation`, on the native grid of the test cases.
"""

from __future__ import annotations

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
from medseg.inference import predict_logits
from medseg.tasks.optimization import OptimizationMixin, total_steps_keyword

__all__ = ["SegmentationTask", "total_steps_keyword"]


class SegmentationTask(OptimizationMixin, L.LightningModule):
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
        # (K-1,), NaN where both are empty; a plain tensor: a MetaTensor would reach ModelCheckpoint's saved best score
        dice = self._dice(pred.to(ref.device), ref)[0].as_subclass(torch.Tensor).to(self._val_sum)
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
