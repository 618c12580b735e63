"""Where medseg keeps data, results and weights.

As in nnU-Net, the three folders come from environment variables so that the same configs work on a laptop and on a
cluster. Unlike nnU-Net, each has a default under the current directory, so the demo runs with nothing set; the
Hydra configs read the same variables through ``${oc.env:...}``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from medseg.errors import ConfigError, DatasetError

__all__ = [
    "ENV_DATA",
    "ENV_RESULTS",
    "ENV_WEIGHTS",
    "data_root",
    "find_dataset",
    "results_root",
    "weights_root",
]

ENV_DATA = "MEDSEG_DATA"
ENV_RESULTS = "MEDSEG_RESULTS"
ENV_WEIGHTS = "MEDSEG_WEIGHTS"

_DEFAULTS = {ENV_DATA: "data", ENV_RESULTS: "results", ENV_WEIGHTS: "weights"}


def _folder(variable: str, must_exist: bool) -> Path:
    raw = os.environ.get(variable) or _DEFAULTS[variable]
    path = Path(raw).expanduser().resolve()
    if must_exist and not path.is_dir():
        source = f"${variable}={os.environ[variable]}" if os.environ.get(variable) else f"the default ./{raw}"
        raise ConfigError(
            f"The folder {path} (from {source}) does not exist. Set {variable} to an existing folder, "
            f"e.g. `export {variable}=/path/to/{raw}`, or create it."
        )
    return path


def data_root(must_exist: bool = False) -> Path:
    """Folder of ``DatasetNNN_Name`` folders in the nnU-Net v2 raw layout (``$MEDSEG_DATA``, default ``./data``)."""
    return _folder(ENV_DATA, must_exist)


def results_root(must_exist: bool = False) -> Path:
    """Folder holding run folders ``<dataset>/<model>__<adapter>__<init>/fold_<k>`` (``$MEDSEG_RESULTS``)."""
    return _folder(ENV_RESULTS, must_exist)


def weights_root(must_exist: bool = False) -> Path:
    """Folder holding official checkpoints supplied by the user (``$MEDSEG_WEIGHTS``, default ``./weights``)."""
    return _folder(ENV_WEIGHTS, must_exist)


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_dataset(name: str | os.PathLike[str], root: Path | None = None) -> Path:
    """Resolve a dataset given as a path, a folder name, a numeric ID or a short name (``mni-tissue``).

    Raises:
        DatasetError: nothing matches, or the name is ambiguous; the message lists what is available.
    """
    candidate = Path(name)
    if candidate.is_dir():
        return candidate.resolve()
    root = root if root is not None else data_root()
    if not root.is_dir():
        raise DatasetError(
            f"Dataset '{name}' not found: the data folder {root} does not exist. Set {ENV_DATA} to the folder that "
            f"holds your DatasetNNN_Name folders, or build a demo dataset with `medseg prepare synthetic`."
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"Dataset\d{3}_.+", p.name))
    text = str(name)
    matches = [p for p in folders if p.name == text]
    if not matches and text.isdigit():
        matches = [p for p in folders if int(p.name[7:10]) == int(text)]
    if not matches:
        matches = [p for p in folders if _normalise(p.name[11:]) == _normalise(text)]
    if len(matches) == 1:
        return matches[0]
    available = ", ".join(p.name for p in folders) or "none"
    if not matches:
        raise DatasetError(
            f"Dataset '{name}' not found in {root} (set by {ENV_DATA}). Available: {available}. "
            f"Give a path, a DatasetNNN_Name folder name or its ID (demo datasets: `medseg prepare synthetic`, "
            f"`medseg prepare mni-tissue`)."
        )
    raise DatasetError(f"Dataset '{name}' is ambiguous in {root}: {available}. Use the full folder name.")
