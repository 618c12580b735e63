"""Building objects from Hydra configs without burying medseg's own error messages.

``hydra.utils.instantiate`` wraps whatever a constructor raises in an ``InstantiationException`` whose text repeats
the traceback context. When the cause is a :class:`~medseg.errors.MedsegError` (a missing dataset, a bad window
name), the user should see that message alone, so it is re-raised as it was.

:data:`CONFIG_DIR` is the one place that knows where the Hydra configs live (every command composes from it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate

from medseg.errors import MedsegError

__all__ = ["CONFIG_DIR", "instantiate"]

#: The repository's ``conf/`` folder: the Hydra config tree of every command.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def instantiate(config: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a :class:`MedsegError` raised by the object being built."""
    try:
        return hydra_instantiate(config, *args, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, MedsegError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
