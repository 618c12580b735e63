"""What a benchmark ran on, recorded with its numbers: timings mean nothing without the CPU, threads and GPU."""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["machine_facts"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def machine_facts() -> dict:
    """Versions, CPU model and count, torch threads, native CPU bfloat16 (``--precision bf16`` pays off) and GPU."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
