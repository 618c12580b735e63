"""Writing predicted label maps as NIfTI files in the input's exact geometry, atomically.

A prediction is only usable next to its image if a viewer overlays it voxel for voxel: same shape, same qform and
sform (each with its code), not merely an affine that is "close". Given the input file as reference, the label map
inherits its header geometry unchanged; given only an affine (e.g. for a DICOM input, whose RAS affine MONAI
computes), both forms are set to it with code 1 (scanner). Labels are stored as ``uint8`` (``uint16`` above 255) with
intent ``label`` and unit scaling, and the file appears under its name only once complete.

A case of ``medseg predict`` may write class probabilities (``.npz``) beside its label map;
:func:`write_case_outputs` writes both to temporaries and renames them together, the label map last, so a label
map on disk always has its probabilities complete beside it (when they were asked for).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medseg.atomic import atomic_path, atomic_paths
from medseg.inference.preflight import OutputError
from medseg.inference.sliding import InferenceError

__all__ = ["MAX_LABEL", "checked_labels", "label_map_image", "write_case_outputs", "write_label_map"]

Reference = str | os.PathLike[str] | nib.Nifti1Image | np.ndarray | torch.Tensor
MAX_LABEL = int(np.iinfo(np.uint16).max)  # the largest label value a label map holds (uint16)


def checked_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """An ``(X, Y, Z)`` host array of non-negative integer labels (``(1, X, Y, Z)`` accepted), else one clear error:
    what every label-map writer (NIfTI, DICOM SEG) requires before it writes anything."""
    array = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]  # a (1, X, Y, Z) channel-first label map
    if array.ndim != 3:
        raise InferenceError(f"a label map must be (X, Y, Z) (or (1, X, Y, Z)), got shape {array.shape}.")
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.rint(array)):
        raise InferenceError("label map has non-integer values; take the argmax of the scores before writing.")
    if array.size and array.min() < 0:
        raise InferenceError(f"label map has negative values (min {array.min()}); labels are 0..N.")
    return array


def _label_array(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    array = checked_labels(labels)
    top = int(array.max()) if array.size else 0
    if top > MAX_LABEL:
        raise InferenceError(f"label value {top} exceeds {MAX_LABEL}, the largest a uint16 label map holds.")
    return array.astype(np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16)


def _affine_of(reference: np.ndarray | torch.Tensor) -> np.ndarray:
    affine = getattr(reference, "affine", reference)  # a MetaTensor, or the affine itself
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InferenceError(f"reference must be a NIfTI file/image or a 4x4 affine, got an array of {affine.shape}.")
    return affine


def label_map_image(labels: np.ndarray | torch.Tensor, reference: Reference) -> nib.Nifti1Image:
    """The NIfTI image :func:`write_label_map` writes, built (and checked) in memory without touching the disk.

    Lets a caller check the labels before any file exists and save the image under a name of its own choosing (e.g.
    a temporary file renamed together with others, :func:`medseg.atomic.atomic_paths`).

    Raises:
        InferenceError: see :func:`write_label_map`.
    """
    data = _label_array(labels)
    if isinstance(reference, str | os.PathLike | nib.Nifti1Image):
        source = reference if isinstance(reference, nib.Nifti1Image) else nib.load(reference)
        name = getattr(source, "get_filename", lambda: None)() or "the reference image"
        if tuple(source.shape[:3]) != data.shape:
            raise InferenceError(
                f"label map of shape {data.shape} does not match {name} ({tuple(source.shape[:3])}); invert the "
                f"preprocessing first (medseg.inference.to_native)."
            )
        header = source.header.copy()
        image = nib.Nifti1Image(data, source.affine, header=header)
        image.set_qform(source.get_qform(), code=int(source.header["qform_code"]))
        image.set_sform(source.get_sform(), code=int(source.header["sform_code"]))
    else:
        affine = _affine_of(reference)
        image = nib.Nifti1Image(data, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm", "sec")
    image.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header.set_intent("label")
    image.header["cal_min"], image.header["cal_max"] = 0, int(data.max()) if data.size else 0
    return image


def write_label_map(labels: np.ndarray | torch.Tensor, reference: Reference, path: str | os.PathLike[str]) -> Path:
    """Write an integer label map as NIfTI on the reference's grid, atomically.

    Args:
        labels: ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) integer label map on the native grid (e.g. from
            :func:`medseg.inference.native_label_map`).
        reference: the input image (path or ``nibabel`` image), whose shape, qform and sform (with their codes) and
            units are copied; or a 4x4 voxel-to-world affine (RAS+ mm), e.g. a MetaTensor's ``affine`` or a
            MetaTensor itself.
        path: destination ``.nii.gz`` or ``.nii``.

    Returns:
        The written path.

    Raises:
        InferenceError: non-integer, negative or too large labels, or a shape different from the reference's.
    """
    path = Path(path)
    image = label_map_image(labels, reference)
    with atomic_path(path) as temporary:
        nib.save(image, temporary)
    return path


def write_case_outputs(
    labels: np.ndarray | torch.Tensor,
    reference: Reference,
    path: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray] | None = None,
    arrays_path: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write a label map (as :func:`write_label_map`) and optionally an ``.npz`` of ``arrays``, all or nothing.

    The label map is built and checked first; both files go to temporaries, are synced, then renamed: the ``.npz``
    first and the label map last (:func:`medseg.atomic.atomic_paths`).

    Returns:
        The written paths, the label map last.

    Raises:
        InferenceError: labels that cannot be a label map (see :func:`write_label_map`).
        OutputError: the file system refused a write (full disk, permissions), naming the file.
    """
    image = label_map_image(labels, reference)
    paths = [Path(p) for p in ([arrays_path] if arrays is not None else [])] + [Path(path)]
    try:
        with atomic_paths(*paths) as temporaries:
            if arrays is not None:
                with open(temporaries[0], "wb") as handle:
                    np.savez_compressed(handle, **arrays)
            nib.save(image, temporaries[-1])
    except OSError as err:
        raise OutputError(
            f"cannot write {paths[-1]} ({err.strerror or err}). Free disk space, or give -o a writable folder."
        ) from None
    return paths
