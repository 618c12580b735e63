"""What a prediction run reports: the files written per case, and one line per failed case.

Its own module because every kind of model fills it: :func:`medseg.inference.predictor.predict_cases` for
segmentation models and :func:`medseg.inference.classified.predict_classifier_cases` for classifiers, which the
predictor calls; neither needs to import the other for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from medseg.errors import MedsegError

__all__ = ["PredictReport", "failure_message"]

log = logging.getLogger("medseg.predict")
T = TypeVar("T")


@dataclass
class PredictReport:
    """Attributes: ``written`` output files per case name; ``failed`` the error message per case name."""

    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def attempt(self, name: str, work: Callable[[], T], debug: bool = False) -> T | None:
        """Run one case's ``work``; on an error record its one-line message and return ``None`` (``debug``: raise).

        This is what lets a folder run go on past a bad case and list the failures at the end.
        """
        try:
            return work()
        except Exception as err:
            if debug:
                raise
            self.failed[name] = failure_message(err)
            log.debug("case %s failed", name, exc_info=True)
            return None


def failure_message(err: Exception) -> str:
    """One line for a failed case: a MedsegError's own message, else what went wrong in words where it is known
    (memory, a file system error naming its file), else the exception's type and first line."""
    if isinstance(err, MedsegError):
        return str(err)
    if isinstance(err, MemoryError):
        return "out of memory for this case; free memory, or predict it on a machine with more (run with --debug)."
    if isinstance(err, torch.OutOfMemoryError):
        return "the GPU ran out of memory on this case; give a smaller --batch-size, or --device cpu."
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror or err} (run with --debug for the traceback)"
    text = str(err).splitlines()[0][:300] if str(err) else ""
    return f"unexpected {type(err).__name__}: {text} (run with --debug for the traceback)"
