"""Writing datasets so that a reader never sees half of one.

Both the demo builders (``medseg prepare``) and the converters (``medseg convert``) produce a ``DatasetNNN_Name``
folder. A crash, a full disk or Ctrl-C in the middle must not leave a folder that looks like a dataset but lacks
cases, so every dataset is built in a hidden temporary sibling folder and renamed into place only once complete
(a rename within one file system is atomic). Single files are written the same way: to a temporary name, then
``os.replace``. Before any work starts, :func:`check_writable_folder` makes sure the destination is a folder this
process can write (a read-only ``$MEDSEG_DATA`` or one that is a file fails in one line, not after the build).

A demo dataset is built with its folds (:func:`write_demo_folds`): the folds its published results were trained on,
made with medseg's earlier permutation, which new datasets no longer get (they get nnU-Net's folds,
:mod:`medseg.data.splits`).
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

from medseg.atomic import atomic_path, atomic_write_json
from medseg.data.splits import SPLITS_FILE, make_kfold_splits
from medseg.errors import ConfigError, DatasetError

__all__ = [
    "building_dataset",
    "case_paths",
    "check_writable_folder",
    "write_demo_folds",
    "write_nifti",
]

DEMO_SPLIT_SEED = 12345  # data.split_seed's default, with which the demos' published folds were made


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


def check_writable_folder(folder: str | os.PathLike[str], source: str) -> Path:
    """Make sure ``folder`` is, or can be created as, a folder this process can write, before any work starts.

    The check creates and removes a hidden folder inside (the folder itself, or its nearest existing parent when it
    does not exist yet), because permissions alone do not tell: root ignores them, a read-only mount does not.

    Args:
        folder: The destination folder.
        source: Where it comes from, for the message (e.g. ``"$MEDSEG_DATA=/data"`` or ``"--output"``).

    Returns:
        The folder.

    Raises:
        ConfigError: ``folder`` or one of its parents is a file, or the folder cannot be written.
    """
    folder = Path(folder)
    fix = "choose a folder you can write (set MEDSEG_DATA or pass --output FOLDER)"
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f" ({existing} is a file)"
        raise ConfigError(f"{folder} (from {source}) is not a folder{where}; {fix}.")
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".medseg-write-check-", dir=existing))
    except OSError as err:
        raise ConfigError(
            f"{folder} (from {source}) cannot be written ({err.strerror or err}: {existing}); {fix}, or make it "
            f"writable."
        ) from err
    return folder


@contextlib.contextmanager
def building_dataset(final: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Build a dataset folder in a temporary sibling and rename it to ``final`` only if the block succeeds.

    Usage::

        with building_dataset(root / "Dataset990_Synthetic", force=force) as work:
            ...  # write work/dataset.json, work/imagesTr/..., etc.

    On any exception (including KeyboardInterrupt) the temporary folder is deleted and ``final`` is untouched. With
    ``force`` an existing ``final`` is replaced only after the new one is complete.

    Raises:
        DatasetError: ``final`` exists and ``force`` is false, or the folder cannot be written (an ``OSError`` such
            as a full disk, turned into one line naming the folder; the partial build is removed).
    """
    final = Path(final)
    if final.exists() and not force:
        raise DatasetError(
            f"{final} already exists. Remove it, or pass --force (force=True) to rebuild it from scratch."
        )
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
        os.chmod(work, 0o755)  # mkdtemp makes it private; the dataset should be readable like any folder
    except OSError as err:
        raise DatasetError(
            f"{final.parent} cannot be written ({err.strerror or err}); choose a folder you can write (set "
            f"MEDSEG_DATA or pass --output FOLDER). Nothing was written."
        ) from err
    try:
        yield work
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, trash / final.name)
            try:
                os.replace(work, final)
            except BaseException:
                os.replace(trash / final.name, final)  # the old dataset goes back where it was
                shutil.rmtree(trash, ignore_errors=True)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(work, final)
    except OSError as err:  # a full disk, a folder made read-only meanwhile: one line, and no partial dataset
        shutil.rmtree(work, ignore_errors=True)
        raise DatasetError(
            f"building {final} failed ({err.strerror or err}{f': {err.filename}' if err.filename else ''}); the "
            f"partial build was removed{' and the old dataset kept' if final.exists() else ''}. Free disk space or "
            f"fix the folder's permissions, then run again."
        ) from err
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def write_demo_folds(work: Path, num_folds: int, file_ending: str = ".nii.gz") -> Path | None:
    """Write the demo dataset's ``splits_final.json``: its ``num_folds`` (the ``data.num_folds`` of its
    ``conf/data`` file) folds over the cases of ``labelsTr``, with the permutation its published results used
    (:func:`medseg.data.splits.make_kfold_splits`, seed 12345), so that a fresh build trains on those folds and not on
    the nnU-Net folds a new dataset gets. Fewer cases than folds (a test's tiny build): no file; the folds are made
    when a run first needs them."""
    ids = sorted(p.name[: -len(file_ending)] for p in (Path(work) / "labelsTr").glob(f"*{file_ending}"))
    if len(ids) < num_folds:
        return None
    return atomic_write_json(Path(work) / SPLITS_FILE, make_kfold_splits(ids, num_folds, DEMO_SPLIT_SEED))
