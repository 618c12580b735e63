"""Peak memory of the process, as ``summary.json`` (training, evaluation) and the benchmark's ``job.json`` record it.

One reader for every command, so the numbers of a run and of a benchmark job mean the same thing. On Linux the peak
resident memory is the kernel's high-water mark (``VmHWM``), which :func:`reset_peak_rss` lowers to the current use:
the benchmark resets it before each job, because in-process launchers run many jobs in one process and the lifetime
peak would carry over from one job to the next. Elsewhere it is ``getrusage``'s lifetime peak.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    import resource
except ImportError:  # not POSIX: the peak is read from /proc or not at all
    resource = None

__all__ = ["peak_memory_mb", "peak_rss_mb", "reset_peak_rss"]


def reset_peak_rss() -> bool:
    """Lower the peak resident memory to the current use (Linux); ``False`` where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """The process's peak resident memory (MB) since it started or since :func:`reset_peak_rss`; ``None``: unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB -> MB
    except OSError:
        pass
    if resource is None:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (1024**2 if sys.platform == "darwin" else 1024), 1)


def peak_memory_mb() -> dict[str, float | None]:
    """``peak_rss_mb`` (:func:`peak_rss_mb`) and, on CUDA, ``peak_gpu_memory_mb``: the peak allocated by torch."""
    peak = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        peak["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 1024**2, 1)
    return peak
