"""Writing datasets so that a reader never sees half of one.

Both the demo builders (``medseg prepare``) and the converters (``medseg convert``) produce a ``DatasetNNN_Name``
folder. A crash, a full disk or Ctrl-C in the middle must not leave a folder that looks like a dataset but lacks
cases, so every dataset is built in a hidden temporary sibling folder and renamed into place only once complete
(a rename within one file system is atomic). Single files are written the same way: to a temporary name, then
``os.replace``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.atomic import atomic_path
from medseg.errors import DatasetError

__all__ = [
    "building_dataset",
    "case_paths",
    "write_nifti",
]


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str], dtype=None) -> Path:
    """Write a 3D/4D array with its voxel-to-world affine (RAS+ mm) as NIfTI, atomically.

    Both the qform and the sform are set to ``affine`` (code 1, scanner), so every reader (nibabel, SimpleITK,
    MONAI) agrees on the geometry.

    Args:
        array: voxel data in array order ``(i, j, k[, t])``.
        affine: 4x4 matrix mapping voxel indices to world millimetres (RAS+).
        path: destination ending in ``.nii.gz`` or ``.nii``.
        dtype: on-disk type (e.g. ``np.int16`` for HU images, ``np.uint8`` for labels); default: the array's.

    Returns:
        The written path.
    """
    path = Path(path)
    data = np.asarray(array)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as temporary:
        nib.save(image, temporary)
    return path


def case_paths(root: Path, case_id: str, num_channels: int, test: bool = False) -> tuple[list[Path], Path]:
    """Paths of a case's channel images (``CASE_0000.nii.gz``...) and label in the nnU-Net v2 raw layout."""
    images = root / ("imagesTs" if test else "imagesTr")
    labels = root / ("labelsTs" if test else "labelsTr")
    return [images / f"{case_id}_{c:04d}.nii.gz" for c in range(num_channels)], labels / f"{case_id}.nii.gz"


@contextlib.contextmanager
def building_dataset(final: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Build a dataset folder in a temporary sibling and rename it to ``final`` only if the block succeeds.

    Usage::

        with building_dataset(root / "Dataset990_Synthetic", force=force) as work:
            ...  # write work/dataset.json, work/imagesTr/..., etc.

    On any exception (including KeyboardInterrupt) the temporary folder is deleted and ``final`` is untouched. With
    ``force`` an existing ``final`` is replaced only after the new one is complete.

    Raises:
        DatasetError: ``final`` exists and ``force`` is false.
    """
    final = Path(final)
    if final.exists() and not force:
        raise DatasetError(
            f"{final} already exists. Remove it, or pass --force (force=True) to rebuild it from scratch."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    os.chmod(work, 0o755)  # mkdtemp makes it private; the dataset should be readable like any folder
    try:
        yield work
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(work, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
