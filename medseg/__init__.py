"""medseg: adapt pretrained foundation models to CT and MRI, and measure whether it beats training from scratch.

The package root is an entry point like the CLI: it may reach any stage (:func:`load_pretrained` loads a release), and
no module of the package imports it (README "Architecture"; ``lint-imports`` would see the path through it).
"""

from __future__ import annotations

from typing import Any

from medseg.errors import MedsegError

__all__ = ["MedsegError", "__version__", "load_pretrained"]
__version__ = "0.1.0"


def load_pretrained(name_or_path: Any, device: Any = "cpu", **kwargs: Any) -> Any:
    """A released model by registry name or release folder, verified and rebuilt offline.

    See :func:`medseg.release.load.load_pretrained`.
    """
    from medseg.release.load import load_pretrained as _load_pretrained  # lazy: `import medseg` stays cheap (no torch)

    return _load_pretrained(name_or_path, device=device, **kwargs)
