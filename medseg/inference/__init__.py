"""Inference on full volumes: sliding-window or slice-wise logits, inversion to the native grid, NIfTI writing."""

from __future__ import annotations

from medseg.inference.native import native_label_map, to_native
from medseg.inference.sliding import (
    InferenceError,
    SliceGeometry,
    from_model_output,
    predict_logits,
    to_model_input,
)
from medseg.inference.writers import write_label_map

__all__ = [
    "InferenceError",
    "SliceGeometry",
    "from_model_output",
    "native_label_map",
    "predict_logits",
    "to_model_input",
    "to_native",
    "write_label_map",
]
