"""What a ``medseg`` command shows: its own messages and whole tables, without other libraries' chatter.

Two things stood between a user and the output they asked for:

- **Third-party noise.** Importing the stack prints warnings that are about the libraries, not about the user's
  data: MONAI's and timm's ``FutureWarning``/``DeprecationWarning`` on their own APIs, MONAI's "nvImageCodec is not
  available" (a GPU DICOM decoder nobody asked for, logged and warned at every reader construction), and alembic's
  INFO lines from Optuna's Hydra sweeper plugin. :func:`quiet_third_party` (called by every verb of the CLI) hides
  exactly those: deprecation-type warnings raised *outside* medseg, the nvImageCodec messages, alembic below
  WARNING. Warnings medseg raises itself, and everything else, still show. ``--debug`` hides nothing.
- **Cut tables.** Rich lays tables out to the console width, which is 80 columns when output goes to a pipe or a
  file, so a results table in a log or CI job read "pret..." for "pretrained". :func:`wide_console` gives such a
  stream :data:`PIPE_WIDTH` columns (``COLUMNS`` still wins when set); on a terminal nothing changes.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

__all__ = ["PIPE_WIDTH", "quiet_third_party", "wide_console"]

PIPE_WIDTH = 200  # columns of a console that writes to a pipe or a file

_OWN = r"(?!medseg(\.|$))"  # any module but medseg's own (warnings filters match the start of the module name)
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_QUIET_LOGGERS = {"monai.data.nvimgcodec_pydicom_plugin": logging.ERROR, "alembic": logging.WARNING}


def quiet_third_party(debug: bool = False) -> None:
    """Hide other libraries' deprecation warnings, nvImageCodec's notices and alembic's INFO lines (module docstring).

    Args:
        debug: show everything instead (undoes an earlier call's logger levels; warnings filters are left as Python
            set them, since ``--debug`` runs in a fresh process).
    """
    if debug:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    for category in _DEPRECATIONS:
        warnings.filterwarnings("ignore", category=category, module=_OWN)
    warnings.filterwarnings("ignore", message=".*nvImageCodec", category=UserWarning)
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def wide_console(stderr: bool = False, **kwargs: Any) -> Any:
    """A :class:`rich.console.Console` that does not cut tables when it writes to a pipe or a file.

    Args:
        stderr: write to standard error instead of standard output.
        **kwargs: passed on to ``Console``; an explicit ``width`` is kept.
    """
    from rich.console import Console  # lazy: rich takes ~70 ms, and `medseg --help` imports this module

    stream = sys.stderr if stderr else sys.stdout
    if "width" not in kwargs and not os.environ.get("COLUMNS") and not _is_terminal(stream):
        kwargs["width"] = PIPE_WIDTH
    return Console(stderr=stderr, **kwargs)
