"""The memory guard: an input whose header declares more voxels than the machine can hold is refused before reading.

A NIfTI header is 348 bytes and may declare any shape: a 165-byte ``.nii.gz`` that claims 1000^3 float32 voxels
made the readers allocate gigabytes before they found that the data was missing. The declared size is known from
the header alone (nibabel, pydicom with ``stop_before_pixels``), so every reader of medseg compares it with the
limit set here (:func:`medseg.data.headers.check_declared_size`) first.

The limit is ``$MEDSEG_MAX_INPUT_GB`` (decimal gigabytes of the float32 volume medseg works on), by default the
smaller of 16 GB and half of the memory available when the check runs: a scan above it would not survive
preprocessing (which holds a few copies) anyway, and on a shared machine it would push others into swap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from medseg.errors import ConfigError

__all__ = ["ENV_MAX_INPUT_GB", "GB", "available_bytes", "input_limit_bytes", "volume_bytes"]

ENV_MAX_INPUT_GB = "MEDSEG_MAX_INPUT_GB"
_DEFAULT_CAP_BYTES = 16e9
GB = 1e9


def available_bytes() -> float:
    """Memory available to a new allocation: psutil's estimate when installed, else the free pages."""
    try:
        import psutil  # lazy: optional (not a dependency of medseg); the fallback below reads free pages
    except ImportError:
        try:
            return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # not a POSIX system: leave only the fixed cap
            return math.inf
    return float(psutil.virtual_memory().available)


def input_limit_bytes() -> tuple[float, str]:
    """The largest input (bytes of its in-memory volume) and where that limit comes from, for messages.

    Raises:
        ConfigError: ``$MEDSEG_MAX_INPUT_GB`` is set but is not a positive number.
    """
    raw = os.environ.get(ENV_MAX_INPUT_GB, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not value > 0:  # also refuses NaN
            raise ConfigError(
                f"{ENV_MAX_INPUT_GB}={raw!r} is not a positive number of gigabytes; set it to the largest input "
                f"volume to accept, e.g. `export {ENV_MAX_INPUT_GB}=32`."
            )
        return value * GB, f"{ENV_MAX_INPUT_GB}={raw}"
    half = available_bytes() / 2
    if half < _DEFAULT_CAP_BYTES:
        return half, "the default: half of the memory available now"
    return _DEFAULT_CAP_BYTES, "the default: 16 GB"


def volume_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of a volume of ``shape`` once read: medseg computes in float32, so at least 4 bytes a voxel."""
    voxels = math.prod(int(s) for s in shape)
    return voxels * max(int(itemsize), 4)
