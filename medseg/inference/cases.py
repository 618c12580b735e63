"""What ``medseg predict -i INPUT`` means: the cases behind a path, their names, and a checked read of each.

INPUT is one NIfTI file, a DICOM series folder, or a folder of NIfTI files (and of DICOM series sub-folders). Each
case's name is the file name without ``.nii.gz`` / ``.nii``, or the DICOM folder's name, so the output is
``OUTPUT_DIR/<case>.nii.gz``. Files named the nnU-Net way (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``: one file per
channel) are one case named ``CASE``, as nnU-Net names its predictions, so that ``nnUNetv2_evaluate_folder`` and
nnU-Net's ``imagesTs`` layout work on medseg's files unchanged. A case is read through
:func:`medseg.data.io.load_image` (the one reader of medseg) and then checked for what a model cannot take: no finite
voxels, NaN or infinite values, a spatial dimensionality other than 3, or a number of channels the model was not
trained with. Every problem is a
:class:`~medseg.errors.ReaderError` or :class:`~medseg.errors.InputShapeError` naming the file and the fix.
:func:`check_contrast` adds what MR intensity normalisation needs, for the models that normalise so.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from pydicom.misc import is_dicom

from medseg.data.io import NIFTI_SUFFIXES, is_dicom_series, load_image
from medseg.errors import ConfigError, InputShapeError, ReaderError

__all__ = ["Case", "case_name", "check_contrast", "discover_cases", "read_case"]


@dataclass(frozen=True)
class Case:
    """One input of a prediction run.

    Attributes:
        name: the output's stem (``<name>.nii.gz``).
        path: a NIfTI file (the first channel's, for a case of one file per channel) or a DICOM series folder.
        is_dicom: whether ``path`` is a DICOM series (written back as NIfTI with its RAS affine).
        series: for a DICOM folder holding several series, the one to read (SeriesInstanceUID or its unique
            SeriesDescription: ``medseg predict --series``); ``None`` when the folder must hold exactly one.
    """

    name: str
    path: Path
    is_dicom: bool
    series: str | None = None
    channel_files: tuple[Path, ...] = ()

    @property
    def inputs(self) -> tuple[Path, ...]:
        """Every file or folder read for this case, in channel order (nnU-Net's ``CASE_0000``, ``CASE_0001``...)."""
        return self.channel_files or (self.path,)


_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def case_name(path: str | os.PathLike[str]) -> str:
    """``<name>`` of ``<name>.nii.gz`` / ``<name>.nii`` / ``<name>.dcm``, or the folder name of a DICOM series."""
    path = Path(path)
    for suffix in (*NIFTI_SUFFIXES, ".dcm"):
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def discover_cases(source: str | os.PathLike[str], series: str | None = None) -> list[Case]:
    """The cases of ``source``: a NIfTI file, a DICOM series folder, or a folder of NIfTI files / DICOM series.

    Hidden files (e.g. an unfinished ``.tmp`` write) are skipped. Cases come sorted by name, so runs are repeatable.
    ``series`` selects one series in every DICOM folder (:func:`medseg.data.io.load_image`); it is refused for
    NIfTI inputs, where it would be silently ignored.

    Raises:
        ReaderError: ``source`` does not exist, is of another format, holds no cases, or holds two cases of the same
            name (``a.nii`` and ``a.nii.gz`` would overwrite each other's output).
    """
    source = Path(source)
    if not source.exists():
        raise ReaderError(f"input {source} does not exist. Give a NIfTI file, a DICOM series folder, or a folder.")
    if source.is_file() and not _is_nifti(source) and is_dicom(source):  # one DICOM file: a one-slice volume
        cases = [Case(case_name(source), source, True)]
    elif source.is_file():
        if not _is_nifti(source):
            raise ReaderError(
                f"input {source} is neither a NIfTI file (.nii, .nii.gz) nor a DICOM file. For a DICOM series give "
                f"its folder; convert other formats first."
            )
        name = case_name(source)
        channel = _NNUNET_CHANNEL.match(name)
        cases = [Case(channel["case"] if channel and channel["channel"] == "0000" else name, source, False)]
    elif is_dicom_series(source):
        cases = [Case(source.name, source, True, series)]
    else:
        cases = _folder_cases(source, series)
    if series is not None and not any(case.is_dicom for case in cases):
        raise ConfigError(f"--series {series} selects a DICOM series, but input {source} holds no DICOM folder.")
    return cases


def _nnunet_cases(files: list[Path]) -> list[Case] | None:
    """The NIfTI files as nnU-Net cases (one file per channel, ``CASE_XXXX``), or ``None`` if they are not named so.

    Every file must carry a 4-digit channel suffix and every case the channels ``0000`` to ``n - 1`` with the same
    ``n``: files such as ``scan_2019`` and ``scan_2020`` are two scans, not the channels of one.
    """
    groups: dict[str, dict[int, Path]] = {}
    for file in files:
        match = _NNUNET_CHANNEL.match(case_name(file))
        if match is None:
            return None
        groups.setdefault(match["case"], {})[int(match["channel"])] = file
    counts = {len(channels) for channels in groups.values()}
    if len(counts) != 1 or any(sorted(channels) != list(range(len(channels))) for channels in groups.values()):
        return None
    return [
        Case(name, channels[0], False, channel_files=tuple(channels[i] for i in range(len(channels))))
        for name, channels in sorted(groups.items())
    ]


def _folder_cases(source: Path, series: str | None) -> list[Case]:
    files, cases = [], []
    for child in sorted(source.iterdir()):
        if child.name.startswith("."):
            continue
        if _is_nifti(child):
            files.append(child)
        elif child.is_dir() and is_dicom_series(child):
            cases.append(Case(child.name, child, True, series))
    cases += _nnunet_cases(files) or [Case(case_name(f), f, False) for f in files]
    cases.sort(key=lambda case: case.name)
    if not cases:
        raise ReaderError(f"input folder {source} holds no NIfTI files (.nii, .nii.gz) and no DICOM series.")
    names = [c.name for c in cases]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ReaderError(
            f"input folder {source} holds several inputs named {twice} (e.g. .nii and .nii.gz); their outputs would "
            f"collide in OUTPUT_DIR. Rename or move one of them."
        )
    return cases


def read_case(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    channels: int | None = None,
    series: str | None = None,
) -> MetaTensor:
    """Read one case as a ``(C, X, Y, Z)`` MetaTensor (RAS+ affine) and check that a model can take it.

    Args:
        path: a NIfTI file or a DICOM series folder, or the files of a case's channels (:attr:`Case.inputs`).
        channels: the number of image channels the model takes (``None``: any).
        series: the series to read from a DICOM folder holding several (:attr:`Case.series`).

    Raises:
        ReaderError: unreadable, truncated or empty file; non-finite (NaN or infinite) voxels.
        InputShapeError: not 3 spatial dimensions, or another number of channels than ``channels``.
    """
    files = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    path = files[0]
    image = load_image(path, series=series) if len(files) == 1 else _stack_channels(files, series)
    spatial = tuple(int(s) for s in image.shape[1:])
    if len(spatial) != 3:
        raise InputShapeError(
            f"{path} has {len(spatial)} spatial dimensions (array shape {tuple(image.shape)}); medseg predict takes 3D "
            f"volumes (X, Y, Z), with extra channels as a 4th axis. Save the volume as 3D (or 4D multi-channel) NIfTI."
        )
    if min(spatial) == 0:
        raise ReaderError(f"{path} holds an empty array (shape {spatial}).")
    values = torch.as_tensor(image)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        what = "only NaN or infinite values" if bad == values.numel() else f"{bad} NaN or infinite voxel(s)"
        raise ReaderError(
            f"{path} holds {what} (of {values.numel()}). Replace them before predicting, e.g. with "
            f"numpy.nan_to_num or the scanner's background value."
        )
    if channels is not None and image.shape[0] != channels:
        extra = "a 4D/5D file whose extra axes " if image.shape[0] > 1 else "a file that "
        raise InputShapeError(
            f"{path} has {image.shape[0]} channel(s) (array shape {tuple(np.shape(image))}, {extra}the model reads as "
            f"channels), but the model takes {channels}. Give one volume per channel the model was trained on, e.g. "
            f"split the 4D file into 3D volumes."
        )
    return image


def _stack_channels(files: list[Path], series: str | None) -> MetaTensor:
    """One case from one file per channel, refused unless every channel lies on the first one's grid."""
    images = [load_image(file, series=series) for file in files]
    first = images[0]
    for file, image in zip(files[1:], images[1:], strict=True):
        if image.shape[1:] != first.shape[1:] or not np.allclose(
            np.asarray(image.affine), np.asarray(first.affine), atol=1e-4
        ):
            raise InputShapeError(
                f"{file} is not on the grid of {files[0]} (shape {tuple(image.shape[1:])} vs {tuple(first.shape[1:])}"
                f", or another affine): the channels of one case must share one grid. Resample it onto the first "
                f"channel first."
            )
    stacked = torch.cat([torch.as_tensor(image) for image in images])
    return MetaTensor(stacked, affine=first.affine, meta=dict(first.meta))


def check_contrast(
    image: torch.Tensor, path: str | os.PathLike[str], threshold: float, needs: str, hint: str = ""
) -> None:
    """Refuse an image whose voxels above ``threshold`` are none, or all of one value, in some channel.

    MR normalisation (:class:`medseg.data.transforms.ForegroundZScored`, LiteMedSAM's MR percentiles) takes
    percentiles, mean and spread over those voxels and divides by the spread: on an all-zero or constant volume it
    fails deep inside a transform, or turns the image into a constant the model segments as noise. Checked before
    inference, it is one line naming the file.

    Args:
        image: ``(C, X, Y, Z)`` as :func:`read_case` returns it.
        path: the file, for the message.
        threshold: voxels above it are the foreground the normalisation measures.
        needs: what normalises, for the message (e.g. "the run's MRI normalisation").
        hint: a last sentence of the message, e.g. another option that avoids the normalisation.

    Raises:
        ReaderError: naming the file, the channel (of several) and what to check.
    """
    values = torch.as_tensor(image)
    for index, channel in enumerate(values):
        foreground = channel[channel > threshold]
        if not foreground.numel():
            problem = "is all zero" if not bool(channel.any()) else f"has no voxel above {threshold:g}"
        elif bool(foreground.min() == foreground.max()):
            problem = f"holds one value ({float(foreground.min()):g}) in every voxel above {threshold:g}"
        else:
            continue
        where = f" (channel {index})" if len(values) > 1 else ""
        raise ReaderError(
            f"{path}{where} {problem}: {needs} divides by the intensity spread there, so this is no usable scan. "
            f"Check that it is the intended image.{hint}"
        )
