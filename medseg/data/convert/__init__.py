"""``medseg convert FORMAT SOURCE --id N``: public datasets' downloads into the nnU-Net v2 raw layout.

One module per source layout reads and checks the download (``msd``, ``btcv``, ``kits``, ``amos``, ``brats``); the
shared writer in :mod:`medseg.data.convert.common` copies the cases and writes ``dataset.json`` atomically, like
nnU-Net's ``nnUNetv2_convert_MSD_dataset``. Nothing is downloaded: see ``datasets/<format>.md`` for how to obtain
each dataset and its licence.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any

from medseg.data.convert.common import write_plan
from medseg.data.prepare.writing import building_dataset, check_writable_folder
from medseg.errors import ConfigError, DatasetError
from medseg.paths import ENV_DATA, data_root

__all__ = ["FORMATS", "convert_dataset", "dataset_folder_name"]

FORMATS = {
    "msd": "Medical Segmentation Decathlon TaskXX_Name folder (dataset.json, imagesTr, labelsTr, imagesTs)",
    "btcv": "BTCV / Synapse multi-organ abdomen (RawData/Training/img/img0001.nii.gz, label/label0001.nii.gz)",
    "kits": "KiTS23 (dataset/case_00000/imaging.nii.gz, segmentation.nii.gz)",
    "amos": "AMOS22 (dataset.json, imagesTr, labelsTr, imagesVa, labelsVa)",
    "brats": "BraTS 2021 (BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz)",
}


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetNNN_Name`` after checking the ID (1-999) and the name (letters, digits, ``_``, ``-``)."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ConfigError(f"--id must be an integer from 1 to 999 (nnU-Net's DatasetNNN), got {dataset_id!r}.")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise ConfigError(f"--name {name!r} must be letters, digits, '_' or '-' (no spaces), e.g. --name Liver.")
    return f"Dataset{dataset_id:03d}_{name}"


def convert_dataset(
    fmt: str,
    source: str | os.PathLike[str],
    dataset_id: int,
    name: str | None = None,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Convert a public dataset's extracted download into ``<output>/DatasetNNN_<name>`` (nnU-Net v2 raw layout).

    The whole download is checked before anything is written, and the dataset is built in a temporary folder that
    is renamed into place at the end, so a failure never leaves a half-converted dataset.

    Args:
        fmt: one of :data:`FORMATS` (``msd``, ``btcv``, ``kits``, ``amos``, ``brats``).
        source: the extracted download (see ``datasets/<fmt>.md`` for the layout expected).
        dataset_id: nnU-Net dataset ID, 1-999.
        name: dataset name; default from the source (e.g. ``BrainTumour`` for ``Task01_BrainTumour``).
        output: folder of datasets; default ``$MEDSEG_DATA``.
        force: replace an existing dataset of the same folder name.
        progress: print a progress line on stderr.
        **options: format-specific options (``amos``: ``modality="ct"`` or ``"mri"``).

    Returns:
        The converted dataset folder.

    Raises:
        DatasetError: the source does not have the expected layout (the message names the missing file or folder),
            or the dataset exists and ``force`` is false, or another dataset already uses the ID.
        ConfigError: unknown format, bad ID or name, or an output folder that is a file or cannot be written.
    """
    key = str(fmt).lower()
    if key not in FORMATS:
        known = "\n".join(f"  {k}: {v}" for k, v in FORMATS.items())
        raise ConfigError(f"Unknown dataset format {fmt!r}. Known formats:\n{known}")
    source = Path(source).expanduser().resolve()
    if not source.exists():
        raise DatasetError(f"Source folder {source} does not exist: expected the extracted {FORMATS[key]}.")
    root = Path(output).expanduser().resolve() if output is not None else data_root()
    origin = "--output" if output is not None else f"${ENV_DATA}" if os.environ.get(ENV_DATA) else "the default ./data"
    check_writable_folder(root, origin)  # a read-only or file destination fails before the source is read
    module = importlib.import_module(f"medseg.data.convert.{key}")
    plan = module.plan(source, **options)
    if not plan.cases:
        raise DatasetError(f"No cases found in {source}: expected {FORMATS[key]}.")
    folder = dataset_folder_name(dataset_id, name or plan.name)
    if root.is_dir():
        clash = [p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir() and p.name != folder]
        if clash:
            raise DatasetError(
                f"Dataset ID {dataset_id:03d} is already used by {', '.join(clash)} in {root}; choose another --id."
            )
    with building_dataset(root / folder, force=force) as work:
        plan.extra = {"converted_from": f"{key}: {source.name}", **plan.extra}
        write_plan(plan, work, progress=progress)
    return root / folder
