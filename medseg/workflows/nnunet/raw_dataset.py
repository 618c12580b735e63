"""The nnU-Net side of a run folder: the raw dataset of the run's split, its ``splits_final.json``, the environment.

An nnU-Net arm must train on exactly the cases a medseg arm of the same fold, label fraction and seed trains on, and
validate on the same cases. So the raw dataset is written from the run's datamodule split, not from the source
dataset: ``imagesTr``/``labelsTr`` hold the label-fraction subset of the fold's training cases and the fold's
validation cases (links to the source files under nnU-Net's names), and ``splits_final.json`` holds that one fold.
nnU-Net plans on these cases only, as it would if only they were labelled. The test cases are not copied: nnU-Net's
predictor reads them where they are.

nnU-Net reads its three folders from the environment when it is imported; :func:`nnunet_environment` gives the run's
own, so that nothing is shared between runs (arms, folds, seeds) or with a user's nnU-Net installation.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from medseg.atomic import atomic_write_json
from medseg.data.formats import CaseFiles, DatasetInfo, write_dataset_json
from medseg.data.nnunet_reader import nnunet_reader_fields
from medseg.errors import ConfigError

__all__ = [
    "FOLDERS",
    "SPLITS_FILE",
    "nnunet_dataset_name",
    "nnunet_environment",
    "write_raw_dataset",
    "write_splits",
]

#: nnU-Net's environment variable -> the folder under ``<run_dir>/nnunet/``.
FOLDERS = {"nnUNet_raw": "raw", "nnUNet_preprocessed": "preprocessed", "nnUNet_results": "results"}
SPLITS_FILE = "splits_final.json"
_NAME = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_-]+)$")
_FALLBACK_ID = 999


def nnunet_dataset_name(info: DatasetInfo) -> str:
    """``DatasetNNN_Name``: the source's own name when it is one, else ``Dataset999_<name>`` (the run folder holds
    one dataset only, so the ID cannot clash)."""
    if _NAME.match(info.name):
        return info.name
    name = re.sub(r"[^A-Za-z0-9]+", "", info.name.title()) or "Medseg"
    return f"Dataset{_FALLBACK_ID}_{name}"


def nnunet_environment(nnunet_dir: str | os.PathLike[str]) -> dict[str, str]:
    """``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` pointing into the run's ``nnunet/`` folder."""
    return {variable: str(Path(nnunet_dir) / folder) for variable, folder in FOLDERS.items()}


def _channel_files(case: CaseFiles, num_channels: int) -> tuple[Path, ...]:
    """The case's files, one per channel, or a clear refusal for MSD's 4-D multi-channel files."""
    if len(case.images) == num_channels:
        return case.images
    raise ConfigError(
        f"case {case.case_id} has {len(case.images)} image file(s) for {num_channels} channels (one 4-D file per case, "
        f"MSD layout); nnU-Net arms need one file per channel: convert the dataset with `medseg convert msd <folder> "
        f"--id NNN` first."
    )


def _link(source: Path, target: Path) -> None:
    """A symbolic link to the source file (a copy where links are not allowed): nnU-Net only reads it."""
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copy2(source, target)


def write_raw_dataset(
    info: DatasetInfo, train_ids: Sequence[str], val_ids: Sequence[str], raw_root: str | os.PathLike[str]
) -> Path:
    """Write ``raw_root/DatasetNNN_Name`` with the run's training and validation cases; returns its folder.

    Args:
        info: the source dataset (:attr:`SegmentationDataModule.info <medseg.data.datamodule.SegmentationDataModule>`).
        train_ids: the cases the run trains on (the label-fraction subset of the fold's training cases).
        val_ids: the fold's validation cases.
        raw_root: nnU-Net's raw folder of the run (``nnUNet_raw``); an earlier dataset there is replaced.

    Raises:
        ConfigError: a case is missing its label, or stores several channels in one file.
    """
    folder = Path(raw_root) / nnunet_dataset_name(info)
    cases = {c.case_id: c for c in info.training}
    ids = list(dict.fromkeys([*train_ids, *val_ids]))
    ending = info.file_ending
    links = []  # every case is checked before anything is written
    for case_id in ids:
        case = cases[case_id]
        if case.label is None:
            raise ConfigError(f"training case {case_id} of {info.root} has no label in labelsTr/; add it or remove it.")
        for channel, source in enumerate(_channel_files(case, info.num_channels)):
            links.append((source, Path("imagesTr") / f"{case_id}_{channel:04d}{ending}"))
        links.append((case.label, Path("labelsTr") / f"{case_id}{ending}"))
    if folder.exists():
        shutil.rmtree(folder)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for source, target in links:
        _link(source, folder / target)
    # The reader is decided on the whole source dataset (test cases included), so nnU-Net reads every case the way
    # medseg does, the test cases it predicts among them.
    write_dataset_json(
        folder, channel_names=info.channel_names, labels=info.labels, num_training=len(ids), file_ending=ending,
        name=folder.name.split("_", 1)[1], description=f"{info.name}: a medseg run's training and validation cases",
        **nnunet_reader_fields(info.root, ending),
    )  # fmt: skip
    return folder


def write_splits(
    preprocessed_root: str | os.PathLike[str], dataset_name: str, train_ids: Sequence[str], val_ids: Sequence[str]
) -> Path:
    """Write nnU-Net's ``splits_final.json`` with one fold (0): the run's training and validation cases."""
    splits = [{"train": list(train_ids), "val": list(val_ids)}]
    return atomic_write_json(Path(preprocessed_root) / dataset_name / SPLITS_FILE, splits, indent=4)
