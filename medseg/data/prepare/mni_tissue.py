"""Grey/white-matter segmentation on real MR contrast, from the MNI ICBM152 2009a template shipped with nilearn.

nilearn ships the ICBM 2009a nonlinear *symmetric* T1 template and its grey- and white-matter probability maps (1 mm,
197 x 233 x 189, uint8 0-255 on disk) inside the package, so this dataset builds offline. There is only one "subject"
(an average of 152 brains), so cases are made honestly from disjoint blocks of it:

* the volume is optionally averaged 2 x 2 x 2 to 2 mm (partial-volume correct: probabilities are averaged before the
  labels are taken);
* the brain's axial extent is cut into ``num_slabs`` slabs, and each slab into a left and a right hemisphere block;
* whole slabs (both hemispheres, because the template is left-right symmetric: a right block is the mirror image of
  its left twin) are held out as test cases, and ``gap_mm`` of the neighbouring training slabs is discarded so that
  no training voxel lies within ``gap_mm`` of a test voxel;
* each block is a crop whose affine is the template's with the origin shifted, so every voxel keeps its MNI position;
* optionally, ``augment`` copies of each *training* block with a random smooth deformation and bias field (made from
  that block's own voxels only).

Labels: 0 background (CSF, skull, scalp, air), 1 grey matter, 2 white matter, the argmax of (1 - gm - wm, gm, wm).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.data.formats import write_dataset_json
from medseg.data.prepare.writing import building_dataset, case_paths, write_demo_folds, write_nifti
from medseg.errors import ConfigError, DatasetError

__all__ = ["DATASET_NAME", "LABELS", "NUM_FOLDS", "build", "load_template", "tissue_labels"]

DATASET_NAME = "Dataset991_MNITissue"
NUM_FOLDS = 4  # conf/data/mni_tissue.yaml data.num_folds: the folds of the published results (write_demo_folds)
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}


def _probability(image, name: str) -> np.ndarray:
    """Tissue probability in [0, 1] from a nilearn image, whichever dtype this nilearn version returns.

    The files on disk are uint8 0-255 (probability = value / 255). nilearn >= 0.8 returns float32 divided by the
    map's maximum, which is 255 for the shipped maps, i.e. the same value / 255.
    """
    data = np.asanyarray(image.dataobj)
    if np.issubdtype(data.dtype, np.integer):
        return data.astype(np.float32) / 255.0
    data = data.astype(np.float32)
    if data.min() < -1e-6 or data.max() > 1.0 + 1e-6:
        raise DatasetError(
            f"nilearn's MNI152 {name} map has values in [{data.min()}, {data.max()}], not probabilities in [0, 1]; "
            f"this nilearn version changed its format. Please report it with `pip show nilearn`."
        )
    return np.clip(data, 0.0, 1.0)


def load_template(resolution_mm: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The MNI152 2009a T1 template and its GM/WM probabilities, from the files inside nilearn (no download).

    Args:
        resolution_mm: 1 (native 197 x 233 x 189) or 2 (2 x 2 x 2 block average, 98 x 116 x 94).

    Returns:
        ``(t1, gm, wm, affine)``: float32 arrays (T1 in nilearn's 0-1 scale; probabilities in [0, 1]) and the 4x4
        voxel-to-MNI affine (RAS+ mm).
    """
    # lazy: nilearn (with its scikit-learn and pandas imports) is needed only while the demo dataset is built
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    if resolution_mm not in (1, 2):
        raise ConfigError(f"resolution_mm must be 1 or 2 (mm), got {resolution_mm}.")
    images = [load_mni152_template(resolution=1), load_mni152_gm_template(resolution=1)]
    images.append(load_mni152_wm_template(resolution=1))
    affine = np.asarray(images[0].affine, dtype=np.float64)
    if any(img.shape != images[0].shape or not np.allclose(img.affine, affine) for img in images):
        raise DatasetError("nilearn's MNI152 T1, GM and WM templates do not share one grid; cannot build labels.")
    t1 = np.asanyarray(images[0].dataobj).astype(np.float32)
    gm, wm = _probability(images[1], "grey-matter"), _probability(images[2], "white-matter")
    if resolution_mm == 2:
        t1, gm, wm = (_block_mean(volume) for volume in (t1, gm, wm))
        # New voxel (0, 0, 0) is the centre of old voxels 0..1 along each axis, i.e. old index 0.5.
        affine = affine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])
    return t1, gm, wm, affine


def _block_mean(volume: np.ndarray) -> np.ndarray:
    x, y, z = (n // 2 for n in volume.shape)
    blocks = volume[: 2 * x, : 2 * y, : 2 * z].reshape(x, 2, y, 2, z, 2)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Labels 0/1/2 as the most probable of background (1 - gm - wm), grey matter and white matter."""
    background = np.clip(1.0 - gm - wm, 0.0, 1.0)
    return np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)


def _crop_affine(affine: np.ndarray, start: tuple[int, int, int]) -> np.ndarray:
    """Affine of a crop starting at voxel ``start``: same axes, origin moved to that voxel's world position."""
    cropped = affine.copy()
    cropped[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=np.float64) + affine[:3, 3]
    return cropped


def _smooth_field(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma_vox, mode="reflect")
    return field / max(float(np.abs(field).max()), 1e-12)


def _augment(rng: np.random.Generator, t1, gm, wm, voxel_mm: float):
    """A random smooth deformation (<= 3 mm) and a +-10 % smooth bias field, using only this block's voxels."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in t1.shape], indexing="ij")
    coords = [g + (3.0 / voxel_mm) * _smooth_field(rng, t1.shape, 12.0 / voxel_mm) for g in grid]
    warp = [ndimage.map_coordinates(v, coords, order=1, mode="nearest").astype(np.float32) for v in (t1, gm, wm)]
    bias = np.exp(0.1 * _smooth_field(rng, t1.shape, 25.0 / voxel_mm)).astype(np.float32)
    return warp[0] * bias, warp[1], warp[2]


def _slabs(z0: int, z1: int, num_slabs: int) -> list[tuple[int, int]]:
    edges = np.linspace(z0, z1, num_slabs + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def build(
    root: str | os.PathLike[str],
    seed: int = 0,
    resolution_mm: int = 2,
    num_slabs: int = 6,
    num_test_slabs: int = 2,
    gap_mm: float = 4.0,
    augment: int = 0,
    force: bool = False,
) -> Path:
    """Write ``root/Dataset991_MNITissue`` (nnU-Net v2 raw layout) atomically and return its path.

    Args:
        root: folder of datasets (``$MEDSEG_DATA``).
        seed: chooses the held-out slabs and the augmentations; the dataset is a deterministic function of it.
        resolution_mm: 2 (default: 98 x 116 x 94 template, fast on CPU) or 1 (native).
        num_slabs: axial slabs the brain is cut into; each gives a left and a right case.
        num_test_slabs: slabs held out (both hemispheres) as ``imagesTs``; never the top or bottom slab.
        gap_mm: thickness of training slab discarded next to each test slab (mm), against leaks through smoothness.
        augment: deformed, bias-corrupted copies of each training block added to ``imagesTr`` (``*_augN``); when
            making folds, keep a copy in its source's fold (the case id before ``_aug`` names the source).
        force: replace an existing dataset (otherwise :class:`~medseg.errors.DatasetError`).
    """
    if num_slabs < 3 or not 1 <= num_test_slabs <= num_slabs - 2:
        raise ConfigError(
            f"Need num_slabs >= 3 and 1 <= num_test_slabs <= num_slabs - 2 (got {num_slabs}, "
            f"{num_test_slabs}): the top and bottom slabs always train."
        )
    t1, gm, wm, affine = load_template(resolution_mm)
    labels = tissue_labels(gm, wm)
    brain = np.argwhere(labels > 0)
    margin = round(6 / resolution_mm)
    low = np.maximum(brain.min(axis=0) - margin, 0)
    high = np.minimum(brain.max(axis=0) + 1 + margin, labels.shape)
    midline = int(np.ceil(np.linalg.solve(affine[:3, :3], -affine[:3, 3])[0] - 1e-6))  # first voxel with x >= 0
    rng = np.random.default_rng(seed)
    slabs = _slabs(int(brain.min(axis=0)[2]), int(brain.max(axis=0)[2]) + 1, num_slabs)
    test = set(rng.choice(np.arange(1, num_slabs - 1), size=num_test_slabs, replace=False).tolist())
    gap = int(np.ceil(gap_mm / resolution_mm))
    final = Path(root) / DATASET_NAME
    num_train = 0
    with building_dataset(final, force=force) as work:
        for index, (z0, z1) in enumerate(slabs):
            z0 = low[2] if index == 0 else z0
            z1 = high[2] if index == num_slabs - 1 else z1
            if index not in test:
                z0 += gap if index - 1 in test else 0
                z1 -= gap if index + 1 in test else 0
            for side, (x0, x1) in (("L", (low[0], midline)), ("R", (midline, high[0]))):
                block = (slice(x0, x1), slice(low[1], high[1]), slice(z0, z1))
                case_affine = _crop_affine(affine, (x0, low[1], z0))
                volumes = [t1[block], gm[block], wm[block]]
                copies = [("", volumes)]
                if index not in test:
                    copies += [(f"_aug{n + 1}", _augment(rng, *volumes, resolution_mm)) for n in range(augment)]
                for suffix, (image, grey, white) in copies:
                    case_id = f"mni_slab{index}_{side}{suffix}"
                    images, label_path = case_paths(work, case_id, 1, test=index in test)
                    write_nifti(image, case_affine, images[0], dtype=np.float32)
                    write_nifti(tissue_labels(grey, white), case_affine, label_path, dtype=np.uint8)
                    num_train += index not in test
        write_dataset_json(
            work,
            channel_names={0: "T1"},
            labels=LABELS,
            num_training=num_train,
            name="MNITissue",
            description=f"Grey/white matter on the MNI ICBM152 2009a symmetric T1 template ({resolution_mm} mm), "
            f"cut into disjoint hemisphere x axial-slab blocks; test slabs {sorted(test)} held out with a "
            f"{gap_mm:g} mm gap. Built by medseg (seed {seed}); see datasets/mni-tissue.md.",
            reference="Fonov et al., NeuroImage 2011 and 2009 (MNI ICBM152 2009a); shipped by nilearn",
            licence="MNI ICBM152 2009 licence (see datasets/mni-tissue.md)",
            numTest=2 * num_test_slabs,
        )
        write_demo_folds(work, NUM_FOLDS)
    return final
