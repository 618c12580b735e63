"""Axial-slice classification on real MR contrast, from the MNI ICBM152 2009a template shipped with nilearn.

Every ``step``-th axial slice of the 2 mm template (:func:`medseg.data.prepare.mni_tissue.load_template`) that holds
brain becomes one case, stored as a one-slice NIfTI volume that keeps its MNI position, with two labels derived by
fixed rules (not by a rater):

* ``level`` (ordinal): the slice's MNI z in mm: ``inferior`` (z < -20), ``basal`` (-20 <= z < 5), ``ventricular``
  (5 <= z < 35), ``superior`` (z >= 35);
* ``ventricles`` (binary): whether the slice holds at least ``min_csf_voxels`` voxels of deep CSF, i.e. voxels whose
  CSF probability ``1 - gm - wm`` exceeds 0.5 inside the slice's filled brain mask eroded by 12 mm (which removes
  the sulcal CSF at the surface and leaves mostly the lateral and third ventricles).

A ``site`` subgroup column simulates a second scanner: site ``B`` slices (a seeded half) get a smooth multiplicative
bias field (+-15 %) and Gaussian noise (2 % of the range); site ``A`` slices are the template as is.

Split: the slices are grouped in runs of ``run_length`` neighbours; every third run is ``test``, every sixth run (of
the others) ``val``, the rest ``train``, and a training or validation slice next to a test run is dropped, so no
training slice is within ``2 * step`` voxels of a test slice. The slices are still parts of one average brain, so the
cases are strongly correlated: see datasets/mni-slices.md.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.atomic import atomic_write_text
from medseg.data.prepare.mni_tissue import load_template
from medseg.data.prepare.writing import building_dataset, write_nifti

__all__ = ["DATASET_NAME", "LEVELS", "build", "level_of"]

DATASET_NAME = "Dataset992_MNISlices"
LEVELS = ("inferior", "basal", "ventricular", "superior")
_EDGES_MM = (-20.0, 5.0, 35.0)


def level_of(z_mm: float) -> str:
    """The ``level`` class of an axial slice at MNI height ``z_mm`` (mm)."""
    return LEVELS[int(np.searchsorted(_EDGES_MM, z_mm, side="right"))]


def _deep_csf(gm: np.ndarray, wm: np.ndarray, erosion_vox: int) -> int:
    brain = ndimage.binary_fill_holes(gm + wm > 0.5)
    deep = ndimage.binary_erosion(brain, iterations=erosion_vox)
    return int(((1.0 - gm - wm) > 0.5)[deep].sum())


def _site_b(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(size=image.shape), sigma=12, mode="reflect")
    field /= max(float(np.abs(field).max()), 1e-12)
    noise = rng.normal(0.0, 0.02 * float(image.max()), size=image.shape)
    return (image * (1.0 + 0.15 * field) + noise * (image > 0)).astype(np.float32)


def build(
    root: str | os.PathLike[str],
    seed: int = 0,
    step: int = 1,
    run_length: int = 3,
    min_csf_voxels: int = 80,
    force: bool = False,
) -> Path:
    """Write ``root/Dataset992_MNISlices`` (``images/*.nii.gz`` + ``classification.csv``) atomically.

    Args:
        root: folder of datasets (``$MEDSEG_DATA``).
        seed: chooses the site-B slices and their bias fields; the dataset is a deterministic function of it.
        step: take every ``step``-th axial slice of the 2 mm template (1: every slice, 2 mm apart).
        run_length: neighbouring slices per split run.
        min_csf_voxels: deep-CSF voxels (2 mm) for ``ventricles = 1``.
        force: replace an existing dataset.
    """
    t1, gm, wm, affine = load_template(2)
    brain_z = np.flatnonzero((gm + wm > 0.5).any(axis=(0, 1)))
    slices = list(range(int(brain_z.min()) + 1, int(brain_z.max()), step))
    runs = [slices[i : i + run_length] for i in range(0, len(slices), run_length)]
    split_of_run = ["test" if r % 3 == 2 else "val" if r % 6 == 1 else "train" for r in range(len(runs))]
    rng = np.random.default_rng(seed)
    rows = []
    final = Path(root) / DATASET_NAME
    with building_dataset(final, force=force) as work:
        for r, run in enumerate(runs):
            for position, k in enumerate(run):
                split = split_of_run[r]
                near_test = (position == 0 and r > 0 and split_of_run[r - 1] == "test") or (
                    position == len(run) - 1 and r + 1 < len(runs) and split_of_run[r + 1] == "test"
                )
                if split != "test" and near_test:
                    continue
                z_mm = float((affine @ np.array([0.0, 0.0, k, 1.0]))[2])
                site = "B" if rng.random() < 0.5 else "A"
                image = t1[:, :, k : k + 1].astype(np.float32)
                if site == "B":
                    image = _site_b(image, rng)
                case_id = f"mni_z{k:03d}"
                shifted = affine.copy()
                shifted[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3]
                write_nifti(image, shifted, work / "images" / f"{case_id}.nii.gz", dtype=np.float32)
                csf = _deep_csf(gm[:, :, k], wm[:, :, k], erosion_vox=6)
                rows.append([case_id, f"images/{case_id}.nii.gz", level_of(z_mm), int(csf >= min_csf_voxels),
                             site, split, f"{z_mm:.1f}", csf])  # fmt: skip
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case_id", "image", "level", "ventricles", "site", "split", "z_mm", "deep_csf_voxels"])
        writer.writerows(rows)
        atomic_write_text(work / "classification.csv", buffer.getvalue())
    return final
