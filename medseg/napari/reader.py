"""napari reader: NIfTI files, DICOM files and DICOM series folders as image layers in world millimetres.

The manifest claims ``*.nii``, ``*.nii.gz``, ``*.dcm`` and folders; :func:`napari_get_reader` then declines (returns
``None``) every path it cannot read (a folder without DICOM files, a ``.dcm`` without the DICOM preamble), so napari
offers it to other readers instead of failing or asking which plugin to use.

The volume is read by :func:`medseg.data.io.load_image`, the one reader every medseg stage uses, so napari shows
exactly the array ``medseg predict`` and training see (array order ``(X, Y, Z)``, RAS+ affine; a DICOM series' LPS
frame converted). The layer's ``scale``/``translate``/``rotate`` come from that affine
(:func:`medseg.napari.geometry.layer_transform`), so layers read from different files of one patient line up; the
exact affine and the source path are kept in the layer's ``metadata`` for the writer and the widget.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.dicom_series import list_series
from medseg.data.io import NIFTI_SUFFIXES, is_dicom_series, load_image
from medseg.napari.geometry import layer_transform

__all__ = ["case_name", "napari_get_reader", "read_volume"]

LayerData = tuple[np.ndarray, dict[str, Any], str]
PathLike = str | os.PathLike[str]


def case_name(path: PathLike) -> str:
    """The case name ``medseg predict`` gives an input: the file name without ``.nii(.gz)``, or the folder name."""
    path = Path(path)
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file with the DICOM preamble (``DICM`` at byte 128), the test :func:`is_dicom_series` applies."""
    if path.suffix.lower() != ".dcm":
        return False
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _readable(path: PathLike) -> bool:
    path = Path(path)
    if path.is_file():
        return path.name.lower().endswith(NIFTI_SUFFIXES) or _is_dicom_file(path)
    return is_dicom_series(path)


def napari_get_reader(path: PathLike | Sequence[PathLike]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: :func:`read_volume` for NIfTI files, DICOM files and DICOM series folders, ``None`` for
    anything else (so napari offers the path to other readers)."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(_readable(p) for p in paths):
        return None
    return read_volume


def read_volume(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Read volumes as napari image layer data, one layer per channel.

    Args:
        path: a ``.nii``/``.nii.gz`` file, a ``.dcm`` file or a DICOM series folder, or a list of them.

    Returns:
        ``[(array (X, Y, Z) float32, layer kwargs, "image"), ...]`` with ``scale`` = voxel spacing (mm),
        ``translate`` = origin (mm), ``rotate`` = direction cosines, and ``metadata`` holding ``affine`` (4x4, RAS+
        mm), ``source`` (the path), ``series`` (the SeriesInstanceUID read from a folder of several, else ``None``)
        and ``spacing``. A folder of several DICOM series gives one layer per series. A 2-D image (one DICOM slice)
        gets ``Z = 1``: its affine is 4x4 like a volume's, so it lines up with the volumes of the same patient.

    Raises:
        medseg.errors.ReaderError: unreadable, truncated or empty files (the message names the file).
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    layers: list[LayerData] = []
    for item in paths:
        for series, name in _series_of(item):
            layers += _layers(item, series, name)
    return layers


def _series_of(path: PathLike) -> list[tuple[str | None, str]]:
    """``(series, layer name)`` to read from ``path``: a folder of several DICOM series (a PACS export) gives one
    layer per series, named by its SeriesDescription (else the end of its UID), instead of an error."""
    name = case_name(path)
    if not Path(path).is_dir():
        return [(None, name)]
    found = list_series(path)
    if len(found) < 2:
        return [(None, name)]
    return [(uid, f"{name} [{description or uid[-12:]}]") for uid, description in found]


def _layers(item: PathLike, series: str | None, name: str) -> list[LayerData]:
    image = load_image(item, series=series)
    affine = np.asarray(image.affine, dtype=np.float64)
    transform = layer_transform(affine)
    data = np.asarray(image.detach().cpu().numpy(), dtype=np.float32)
    if data.ndim == 3:  # (C, X, Y): a 2-D image
        data = data[..., None]
    layers: list[LayerData] = []
    for channel in range(data.shape[0]):
        metadata = {
            "affine": affine,
            "source": str(Path(item).resolve()),
            "series": series,
            "spacing": tuple(float(s) for s in transform["scale"]),
            "channel": channel,
        }
        kwargs = {
            "name": name if data.shape[0] == 1 else f"{name} [{channel}]",
            "metadata": metadata,
            "rgb": False,  # a volume of 3 or 4 slices is not a colour image
            **transform,
        }
        layers.append((data[channel], kwargs, "image"))
    return layers
