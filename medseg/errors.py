"""One error family for everything a user can fix.

The CLI catches :class:`MedsegError` and prints only its message (no traceback unless ``--debug``), so every
message must name the file, field or variable at fault and say how to fix it.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DatasetError", "InputShapeError", "MedsegError", "ReaderError", "WeightsError"]


class MedsegError(Exception):
    """Base class of errors whose message is meant for the user, not the developer."""


class ConfigError(MedsegError):
    """A setting (environment variable, config field, CLI option) is missing or invalid."""


class DatasetError(MedsegError):
    """A dataset folder or its ``dataset.json`` does not follow the nnU-Net v2 / MSD layout."""


class ReaderError(MedsegError):
    """An image file or DICOM series cannot be read, or reads into something unusable."""


class WeightsError(MedsegError):
    """A checkpoint is missing, truncated, corrupted or of the wrong model."""


class InputShapeError(MedsegError, ValueError):
    """A tensor given to a model has the wrong channel count or a size the model cannot take."""
