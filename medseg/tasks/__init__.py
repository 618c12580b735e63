"""LightningModules: what is optimised (loss), how (optimiser, schedule, parameter groups) and how it is validated.

Models (:mod:`medseg.models`) know nothing about training; a task wraps one and owns the loop-level decisions.
"""

from __future__ import annotations

from medseg.tasks.callbacks import RandomStateCheckpoint, StepProgressBar, WeightsDigest, state_digest
from medseg.tasks.segmentation import SegmentationTask

__all__ = ["RandomStateCheckpoint", "SegmentationTask", "StepProgressBar", "WeightsDigest", "state_digest"]
