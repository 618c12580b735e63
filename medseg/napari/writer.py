"""napari writer: a labels layer as a NIfTI label map on its source image's grid.

The geometry comes, in this order of preference, from the source NIfTI file named in the layer's ``metadata``
(header copied, qform and sform with their codes, as ``medseg predict`` writes), from the ``affine`` stored there by
the reader (DICOM series), or from the layer's own ``scale``/``translate``/``rotate``. The file is written atomically
by :func:`medseg.inference.writers.write_label_map` (``uint8``, ``uint16`` above 255 labels).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.data.io import NIFTI_SUFFIXES
from medseg.errors import ConfigError
from medseg.inference.writers import write_label_map
from medseg.napari.geometry import affine_from_layer, metadata_affine

__all__ = ["label_reference", "write_labels"]


def label_reference(data: np.ndarray, meta: dict[str, Any]) -> Any:
    """What :func:`write_label_map` should copy the geometry from: the source NIfTI path, else a 4x4 affine."""
    metadata = meta.get("metadata") or {}
    source = metadata.get("source")
    if source and str(source).lower().endswith(NIFTI_SUFFIXES) and Path(source).is_file():
        header_shape = tuple(nib.load(source).shape[:3])
        if header_shape == tuple(np.shape(data)):
            return source
    affine = metadata_affine(metadata)
    if affine is not None:
        return affine
    ndim = np.ndim(data)
    return affine_from_layer(
        meta.get("scale", np.ones(ndim)),
        meta.get("translate", np.zeros(ndim)),
        meta.get("rotate"),
        meta.get("affine"),
    )


def write_labels(path: str | os.PathLike[str], data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for labels: ``path`` (``.nii.gz`` or ``.nii``) on the source image's grid.

    Args:
        path: destination; a name without a NIfTI suffix gets ``.nii.gz``.
        data: the labels layer's ``(X, Y, Z)`` integer array.
        meta: the layer attributes napari passes (``metadata``, ``scale``, ``translate``, ``rotate``, ``affine``).

    Returns:
        The written path, as napari's writer contract asks.

    Raises:
        ConfigError: the layer is not 3-D.
    """
    array = np.asarray(data)
    if array.ndim != 3:
        raise ConfigError(f"medseg writes 3-D label volumes; this labels layer has shape {array.shape}.")
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        path = path.with_name(path.name + ".nii.gz")
    return [str(write_label_map(array, label_reference(array, meta), path))]
