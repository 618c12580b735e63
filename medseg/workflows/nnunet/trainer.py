"""nnU-Net's own trainer, stopped after a number of iterations instead of 1000 epochs of 250.

An arm of a benchmark trains for a step budget; nnU-Net counts epochs. :class:`StepBudgetTrainer` changes nothing of
nnU-Net's training but its length: ``epochs = ceil(steps / iterations_per_epoch)``, and the last epoch runs only
the iterations that are left, so exactly ``max_steps`` optimisation steps run and the poly learning-rate schedule
spans the epochs actually trained. Validation batches scale with the epoch's length (nnU-Net's 50 per 250), since a
4-step epoch followed by 50 validation batches would spend most of a small budget on a pseudo Dice nobody reads.

Imported only inside nnU-Net's process (:mod:`medseg.workflows.nnunet.worker`): it imports ``nnunetv2``, which
reads its folders from the environment at import time. nnU-Net looks trainer classes up by name inside its own
package only, so the predictor is built from this class directly, never by name.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

__all__ = ["StepBudgetTrainer"]


class StepBudgetTrainer(nnUNetTrainer):
    """nnU-Net's default trainer for ``max_steps`` iterations; call :meth:`set_budget` before ``run_training``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.max_steps = self.num_iterations_per_epoch * self.num_epochs
        self.full_epoch = self.num_iterations_per_epoch
        self.full_val_epoch = self.num_val_iterations_per_epoch
        self.steps_trained = 0

    def set_budget(
        self, max_steps: int, iterations_per_epoch: int, val_iterations_per_epoch: int, lr: float | None
    ) -> None:
        """Train ``max_steps`` iterations in epochs of ``iterations_per_epoch``; ``lr`` ``None``: nnU-Net's 1e-2."""
        self.max_steps = max_steps
        self.full_epoch = iterations_per_epoch
        self.full_val_epoch = val_iterations_per_epoch
        self.num_epochs = -(-max_steps // iterations_per_epoch)
        if lr is not None:
            self.initial_lr = lr
        self.print_to_log_file(
            f"medseg step budget: {max_steps} iterations in {self.num_epochs} epoch(s) of up to "
            f"{iterations_per_epoch}, initial lr {self.initial_lr}"
        )

    def on_train_epoch_start(self) -> None:
        # run_training reads both counts after this hook, so the last epoch stops at the budget.
        left = self.max_steps - self.current_epoch * self.full_epoch
        self.num_iterations_per_epoch = max(0, min(self.full_epoch, left))
        share = self.num_iterations_per_epoch / self.full_epoch
        self.num_val_iterations_per_epoch = max(1, round(self.full_val_epoch * share))
        super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        self.steps_trained += 1
        return super().train_step(batch)
