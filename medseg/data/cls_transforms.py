"""The few transforms classification needs on top of the segmentation pipeline: 2-D image files, slices, squares.

Classification images go through the same MONAI pipeline and presets as segmentation (``conf/data/preprocess``):
:class:`LoadClassificationd` reads NIfTI/DICOM through :func:`medseg.data.io.load_case` (and PNG/JPEG through MONAI's
PIL reader), the preset runs, :class:`ToSpatialDimsd` drops the singleton axis of a 2-D slice stored as a one-slice
volume (so the 3-D MRI/CT presets work on slices too), and :class:`SquarePadd` pads the in-plane axes to a square
before the resize to the model's input size, so anatomy keeps its aspect ratio.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform

from medseg.data.io import load_case
from medseg.errors import ReaderError

__all__ = ["PIL_SUFFIXES", "LoadClassificationd", "SquarePadd", "ToSpatialDimsd", "load_classification_image"]

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def load_classification_image(paths: Any) -> MetaTensor:
    """Channel-first image of one case: NIfTI/DICOM via :func:`load_case`, PNG/JPEG as ``(C, H, W)`` (greyscale: 1)."""
    files = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not all(str(p).lower().endswith(PIL_SUFFIXES) for p in files):
        return load_case(files)
    channels = []
    for path in files:
        try:
            image = EnsureChannelFirst()(LoadImage(reader="PILReader", image_only=True)(str(path)))
        except Exception as err:
            raise ReaderError(f"{path} cannot be read as an image ({type(err).__name__}: {err}).") from err
        channels.append(torch.as_tensor(image).float())
    return MetaTensor(torch.cat(channels, dim=0))


class LoadClassificationd(MapTransform):
    """Dictionary form of :func:`load_classification_image` (replaces ``LoadImaged`` + ``EnsureChannelFirstd``)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_classification_image(d[key])
        return d


class ToSpatialDimsd(MapTransform):
    """Make an image ``(C, H, W)`` for ``spatial_dims=2`` by dropping singleton spatial axes; check 3-D volumes.

    A 2-D slice saved as NIfTI is ``(C, X, Y, 1)`` after loading; the CT/MRI presets (orientation, spacing) treat it
    as a one-slice volume, and this transform then makes it a 2-D image.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if spatial_dims not in (2, 3):
            raise ReaderError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            shape = tuple(image.shape[1:])
            if len(shape) > self.spatial_dims:
                singletons = [i + 1 for i, n in enumerate(shape) if n == 1]
                drop = singletons[len(singletons) - (len(shape) - self.spatial_dims) :] if singletons else []
                if len(drop) != len(shape) - self.spatial_dims:
                    raise ReaderError(
                        f"case {d.get('case_id', '?')}: image of spatial shape {shape} is not {self.spatial_dims}-D "
                        f"(set data.spatial_dims=3 for volumes, or store 2-D slices with one slice)."
                    )
                tensor = torch.as_tensor(image)
                for axis in sorted(drop, reverse=True):
                    tensor = tensor.squeeze(axis)
                image = MetaTensor(tensor) if isinstance(image, MetaTensor) else tensor
            elif len(shape) < self.spatial_dims:
                raise ReaderError(
                    f"case {d.get('case_id', '?')}: image of spatial shape {shape} is 2-D but data.spatial_dims=3."
                )
            d[key] = image
        return d


class SquarePadd(MapTransform):
    """Zero-pad the first two spatial axes symmetrically to a square (the depth axis of a volume is left alone)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            h, w = image.shape[1:3]
            side = max(h, w)
            pad = [0, 0] * (image.ndim - 3)  # trailing axes first, as F.pad wants
            pad += [(side - w) // 2, side - w - (side - w) // 2, (side - h) // 2, side - h - (side - h) // 2]
            d[key] = torch.nn.functional.pad(image, pad)
        return d
