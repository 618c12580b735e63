"""Image/volume classification as a LightningModule: the ``peft`` and ``full`` rungs of the protocol ladder.

The loss follows the label kind: cross-entropy for binary (two softmax outputs), multi-class and ordinal labels,
binary cross-entropy per label for multi-label. Optimisation reuses the segmentation conventions: the model's
``param_groups`` (head and adapters at ``lr``, the backbone at ``lr * backbone_lr_scale`` with optional layer-wise
decay), a partial optimiser and a per-step scheduler whose length defaults to the run's number of steps. Validation
scores the validation cases with :func:`medseg.evaluation.classification.metrics.classification_metrics` and logs
``val/auroc_macro``, ``val/accuracy`` and ``val/loss`` (all cases, gathered on one process).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError
from medseg.evaluation.classification.metrics import classification_metrics
from medseg.tasks.segmentation import total_steps_keyword

__all__ = ["ClassificationTask"]


class ClassificationTask(L.LightningModule):
    """Trains a :class:`~medseg.models.classifier.Classifier` (or ``CNNClassifier``).

    Args:
        model: the classifier (``label_kind``, ``param_groups``, ``trainable_report``, ``activate``).
        optimizer: partial optimiser (``_partial_: true``) with the base ``lr`` and ``weight_decay``.
        scheduler: partial scheduler stepped every step, or ``None``.
        backbone_lr_scale: learning-rate factor of the pretrained backbone parameters.
        layer_decay: layer-wise learning-rate decay in (0, 1], or ``None``.
        label_smoothing: cross-entropy label smoothing (single-label kinds only).
        class_names: names of the outputs, for per-class validation metrics.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        backbone_lr_scale: float = 0.1,
        layer_decay: float | None = None,
        label_smoothing: float = 0.0,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {"backbone_lr_scale": backbone_lr_scale, "layer_decay": layer_decay, "label_smoothing": label_smoothing}
        )
        self.model = model
        self.kind = str(model.label_kind)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.backbone_lr_scale, self.layer_decay, self.label_smoothing = backbone_lr_scale, layer_decay, label_smoothing
        self.class_names = list(class_names) if class_names else None
        self._val_probs: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (single-label) or per-label binary cross-entropy (multi-label), in nats."""
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return F.cross_entropy(logits.float(), target.long().reshape(-1), label_smoothing=self.label_smoothing)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.model(batch["image"]), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_probs, self._val_targets = [], []

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        logits = self.model(batch["image"])
        self.log("val/loss", self.loss(logits, batch["target"]), batch_size=batch["image"].shape[0])
        self._val_probs.append(self.model.activate(logits).detach().float().cpu())
        self._val_targets.append(batch["target"].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_probs:
            return
        probs = torch.cat(self._val_probs).numpy()
        targets = torch.cat(self._val_targets).numpy()
        metrics = classification_metrics(probs, np.asarray(targets), self.kind, self.class_names)
        self.log("val/accuracy", float(metrics["accuracy"]), prog_bar=True)
        if metrics["auroc_macro"] is not None:
            self.log("val/auroc_macro", float(metrics["auroc_macro"]), prog_bar=True)

    def configure_optimizers(self) -> Any:
        keywords = getattr(self.optimizer_factory, "keywords", {}) or {}
        lr = keywords.get("lr")
        if lr is None:
            raise ConfigError("task.optimizer needs an `lr` (the base learning rate of head and adapters).")
        groups = self.model.param_groups(
            lr=lr, backbone_lr_scale=self.backbone_lr_scale, layer_decay=self.layer_decay,
            weight_decay=keywords.get("weight_decay", 0.0) or 0.0,
        )  # fmt: skip
        if not any(len(g["params"]) for g in groups):
            raise ConfigError("the classifier has no trainable parameter: check adapter=... and protocol=....")
        optimizer = self.optimizer_factory(params=groups)
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        keyword = total_steps_keyword(self.scheduler_factory)
        if keyword is not None:
            kwargs[keyword] = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def trainable_report(self) -> dict[str, Any]:
        return dict(self.model.trainable_report())
