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
    "DEMO_DATASETS",
    "ENV_DATA",
    "ENV_RESULTS",
    "ENV_WEIGHTS",
    "check_output_folder",
    "data_root",
    "find_dataset",
    "results_root",
    "weights_root",
]

ENV_DATA = "MEDSEG_DATA"
ENV_RESULTS = "MEDSEG_RESULTS"
ENV_WEIGHTS = "MEDSEG_WEIGHTS"

_DEFAULTS = {ENV_DATA: "data", ENV_RESULTS: "results", ENV_WEIGHTS: "weights"}

#: The demo datasets ``medseg prepare NAME`` builds: short name -> module with ``DATASET_NAME`` and
#: ``build(root, seed) -> Path``. Named here, where a missing dataset's message points at them; built by
#: :mod:`medseg.data.prepare.command`.
DEMO_DATASETS = {
    "synthetic": "medseg.data.prepare.synthetic",
    "mni-tissue": "medseg.data.prepare.mni_tissue",
    "mni-slices": "medseg.data.prepare.mni_slices",
}


def _source(variable: str) -> str:
    """How the folder of ``variable`` was chosen, for messages: ``$MEDSEG_RESULTS=/x`` or ``the default ./results``."""
    return f"${variable}={os.environ[variable]}" if os.environ.get(variable) else f"the default ./{_DEFAULTS[variable]}"


def _folder(variable: str, must_exist: bool) -> Path:
    raw = os.environ.get(variable) or _DEFAULTS[variable]
    path = Path(raw).expanduser().resolve()
    if must_exist and not path.is_dir():
        source = _source(variable)
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


def check_output_folder(path: str | os.PathLike[str], variable: str = ENV_RESULTS) -> Path:
    """Check, without creating anything, that ``path`` is a writable folder or can be created as one.

    Hydra creates the run folder before medseg code runs, so a results folder that is a file or read-only would
    surface as a traceback from deep inside Hydra; this finds it first. Problems inside the folder ``variable``
    sets are reported against the variable, which is what the user can change.

    Raises:
        ConfigError: a part of ``path`` is a file, or the folder (or its nearest existing parent) is not writable.
    """
    path = Path(path).expanduser().absolute()
    root = Path(os.environ.get(variable) or _DEFAULTS[variable]).expanduser().absolute()
    inside = path == root or root in path.parents
    where = f"{variable} ({_source(variable)})" if inside else "the output folder"
    fix = (
        f"set {variable} to a writable folder (it is created if missing), e.g. `export {variable}=$HOME/medseg-"
        f"{_DEFAULTS[variable]}`"
        if inside
        else "choose a writable folder"
    )
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file, not a folder, so {path} cannot be created in {where}: {fix}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{existing} is not writable, so {path} cannot be created in {where}: {fix}.")
    return path


def _demo_hint(name: str) -> str:
    """The ``medseg prepare`` command that builds ``name`` when it is a demo dataset, else the list of them."""
    for demo in DEMO_DATASETS:
        if _normalise(demo) == _normalise(name):
            return f"build it with `medseg prepare {demo}`"
    return "demo datasets: " + ", ".join(f"`medseg prepare {demo}`" for demo in DEMO_DATASETS)


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
            f"holds your DatasetNNN_Name folders ({_demo_hint(str(name))})."
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
            f"Give a path, a DatasetNNN_Name folder name or its ID ({_demo_hint(str(name))})."
        )
    raise DatasetError(f"Dataset '{name}' is ambiguous in {root}: {available}. Use the full folder name.")
