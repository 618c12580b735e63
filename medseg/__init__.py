"""medseg: adapt pretrained foundation models to CT and MRI, and measure whether it beats training from scratch."""

from __future__ import annotations

from medseg.errors import MedsegError

__all__ = ["MedsegError", "__version__"]
__version__ = "0.1.0"
