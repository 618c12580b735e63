"""A small synthetic CT dataset of abdominal phantoms, for tests, demos and geometry checks.

Each phantom is an elliptical body in air with a subcutaneous fat layer, soft tissue, and four labelled organs
(liver, kidneys, spleen, vertebral bone) whose shapes are smooth, randomly perturbed blobs. The anatomy is defined in
*world* coordinates (RAS+ millimetres): the array is only a sampling of it through the case's affine. A phantom made
in LPS, in a permuted orientation or with an oblique affine therefore labels the same physical points as its RAS
twin, which is what the geometry tests downstream rely on.

To be learnable but not trivial, images carry a point-spread blur, Gaussian noise, a smooth multiplicative and
additive bias field, and unlabelled distractors (paraspinal muscle, bowel gas). Spacing is anisotropic and varies
per case; some cases are stored in non-RAS or permuted orientations and some with oblique (rotated) affines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.data.formats import write_dataset_json
from medseg.data.prepare.writing import building_dataset, case_paths, write_demo_folds, write_nifti
from medseg.errors import ConfigError

__all__ = [
    "DATASET_NAME",
    "HU",
    "LABELS",
    "NUM_FOLDS",
    "build",
    "make_phantom",
    "phantom_affine",
]

DATASET_NAME = "Dataset990_Synthetic"
NUM_FOLDS = 4  # conf/data/synthetic.yaml data.num_folds: the folds of the published results (write_demo_folds)
LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "bone": 4}
# Mean Hounsfield units of each tissue before bias and noise (contrast-enhanced, portal-venous-like phase).
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft_tissue": 40.0,
    "muscle": 55.0,
    "liver": 90.0,
    "spleen": 120.0,
    "kidney": 180.0,
    "bone_cortex": 800.0,
    "bone_marrow": 300.0,
    "disc": 90.0,
    "gas": -700.0,
}
_AXES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
# Orientations cycled over the built cases: mostly RAS, with DICOM-like LPS, LAS, and FreeSurfer's permuted LIA.
_CASE_ORIENTATIONS = ("RAS", "LPS", "RAS", "LAS", "RAS", "LIA")


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def phantom_affine(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    orientation: str = "RAS",
    oblique_degrees: float = 0.0,
    oblique_axis: tuple[float, float, float] = (1.0, 0.0, 0.0),
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Voxel-to-world (RAS+ mm) affine of a grid centred on ``center_mm``.

    Args:
        shape: array shape in voxels, in array order.
        spacing: voxel size in mm along each array axis.
        orientation: three letters (nibabel axcodes) naming where each array axis points, e.g. ``"RAS"``, ``"LPS"``
            (DICOM), ``"LIA"`` (permuted, FreeSurfer).
        oblique_degrees: rotation of the grid about ``oblique_axis`` (world), e.g. a gantry tilt about x.
        oblique_axis: world direction of the rotation axis.
        center_mm: world position of the array's centre.
    """
    code = orientation.upper()
    if len(code) != 3 or any(c not in _AXES for c in code) or len({_AXES[c][0] for c in code}) != 3:
        raise ConfigError(f"orientation {orientation!r} must be 3 letters from R/L, A/P, S/I, one per axis (e.g. LPS).")
    directions = np.zeros((3, 3))
    for column, letter in enumerate(code):
        axis, sign = _AXES[letter]
        directions[axis, column] = sign
    affine = np.eye(4)
    affine[:3, :3] = _rotation(np.asarray(oblique_axis), oblique_degrees) @ directions @ np.diag(spacing)
    centre_index = (np.asarray(shape, dtype=np.float64) - 1) / 2
    affine[:3, 3] = np.asarray(center_mm, dtype=np.float64) - affine[:3, :3] @ centre_index
    return affine


@dataclass(frozen=True)
class _Blob:
    """A smooth perturbed ellipsoid in world mm: inside where ``|R^T (x - c) / s| + sum a sin(k.(x - c) + p) < 1``."""

    center: np.ndarray  # (3,) mm
    semi_axes: np.ndarray  # (3,) mm
    rotation: np.ndarray  # (3, 3)
    waves: np.ndarray  # (W, 3) rad/mm
    phases: np.ndarray  # (W,)
    amplitudes: np.ndarray  # (W,) fraction of the radius

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Membership of world points given as a ``(3, N)`` array in mm."""
        # Only points within the blob's reach can be inside; testing those alone keeps building fast.
        reach = self.semi_axes.max() * (1.0 + self.amplitudes.sum())
        near = np.abs(points[0] - self.center[0]) < reach
        near &= np.abs(points[1] - self.center[1]) < reach
        near &= np.abs(points[2] - self.center[2]) < reach
        offset = points[:, near] - self.center[:, None]
        radius_sq = np.zeros(offset.shape[1])
        for axis in range(3):
            radius_sq += (self.rotation[:, axis] @ offset / self.semi_axes[axis]) ** 2
        wobble = np.zeros(offset.shape[1])
        for wave, phase, amplitude in zip(self.waves, self.phases, self.amplitudes):
            wobble += amplitude * np.sin(wave @ offset + phase)
        result = np.zeros(points.shape[1], dtype=bool)
        result[near] = np.sqrt(radius_sq) + wobble < 1.0
        return result


def _blob(rng: np.random.Generator, center, semi_axes, jitter_mm: float = 3.0, wobble: float = 0.08) -> _Blob:
    axis = rng.normal(size=3)
    waves = rng.normal(size=(3, 3))
    waves *= (2 * np.pi / rng.uniform(25.0, 45.0, size=(3, 1))) / np.linalg.norm(waves, axis=1, keepdims=True)
    return _Blob(
        center=np.asarray(center, dtype=np.float64) + rng.uniform(-jitter_mm, jitter_mm, size=3),
        semi_axes=np.asarray(semi_axes, dtype=np.float64) * rng.uniform(0.85, 1.15, size=3),
        rotation=_rotation(axis, rng.uniform(-15.0, 15.0)),
        waves=waves,
        phases=rng.uniform(0, 2 * np.pi, size=3),
        amplitudes=rng.uniform(0.3, 1.0, size=3) * wobble,
    )


def _gas_centre(rng: np.random.Generator) -> tuple[float, float, float]:
    """Bowel gas lies anterior (+y), mostly left of the liver."""
    return rng.uniform(-20, 5), rng.uniform(8, 22), rng.uniform(-20, 20)


@dataclass(frozen=True)
class _Anatomy:
    """One random abdomen, entirely in world coordinates (RAS+ mm: +x is the subject's right, +y anterior)."""

    body: np.ndarray  # semi-axes (x, y) of the elliptical body cylinder, mm
    fat_mm: float
    liver: tuple[_Blob, ...]
    spleen: _Blob
    kidneys: tuple[_Blob, ...]
    spine_xy: np.ndarray  # centre (x, y) of the vertebral column, mm
    spine_semi: np.ndarray  # semi-axes (x, y), mm
    disc_period_mm: float
    disc_offset_mm: float
    muscles: tuple[_Blob, ...]
    gas: tuple[_Blob, ...]
    bias_waves: np.ndarray  # (2, 3) rad/mm
    bias_phases: np.ndarray  # (2,)
    bias_gain: float  # multiplicative amplitude on attenuation (HU + 1000)
    bias_offset_hu: float  # additive amplitude, HU

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Anatomy:
        # The liver sits on the subject's right (+x), the spleen on the left, kidneys and spine posterior (-y).
        bias_waves = rng.normal(size=(2, 3))
        bias_waves *= (2 * np.pi / rng.uniform(180.0, 260.0, size=(2, 1))) / np.linalg.norm(bias_waves, axis=1)[:, None]
        spine_y = -20.0 + rng.uniform(-2, 2)
        return cls(
            body=np.array([44.0, 32.0]) * rng.uniform(0.93, 1.07, size=2),
            fat_mm=rng.uniform(3.0, 6.0),
            liver=(_blob(rng, (17, 4, 8), (17, 14, 17)), _blob(rng, (4, 10, 14), (10, 8, 9))),
            spleen=_blob(rng, (-24, -3, 10), (9, 11, 13)),
            kidneys=(_blob(rng, (18, -14, -10), (7, 6, 13), 2.0), _blob(rng, (-18, -14, -8), (7, 6, 13), 2.0)),
            spine_xy=np.array([rng.uniform(-1.5, 1.5), spine_y]),
            spine_semi=np.array([7.0, 6.0]) * rng.uniform(0.9, 1.1, size=2),
            disc_period_mm=rng.uniform(22.0, 28.0),
            disc_offset_mm=rng.uniform(0.0, 25.0),
            muscles=(_blob(rng, (9, spine_y - 4, 0), (5, 5, 60)), _blob(rng, (-9, spine_y - 4, 0), (5, 5, 60))),
            gas=tuple(_blob(rng, _gas_centre(rng), (4, 4, 4)) for _ in range(int(rng.integers(2, 5)))),
            bias_waves=bias_waves,
            bias_phases=rng.uniform(0, 2 * np.pi, size=2),
            bias_gain=rng.uniform(0.005, 0.015),
            bias_offset_hu=rng.uniform(5.0, 15.0),
        )

    def evaluate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free HU and labels at world points ``(3, N)`` in mm; later structures paint over earlier ones."""
        hu = np.full(points.shape[1], HU["air"], dtype=np.float32)
        label = np.zeros(points.shape[1], dtype=np.uint8)
        x, y, z = points
        body = (x / self.body[0]) ** 2 + (y / self.body[1]) ** 2 < 1
        inner = (x / (self.body[0] - self.fat_mm)) ** 2 + (y / (self.body[1] - self.fat_mm)) ** 2 < 1
        hu[body] = HU["fat"]
        hu[inner] = HU["soft_tissue"]
        for muscle in self.muscles:
            hu[muscle.inside(points) & inner] = HU["muscle"]
        for gas in self.gas:
            hu[gas.inside(points) & inner] = HU["gas"]
        organs = [("liver", blob) for blob in self.liver] + [("spleen", self.spleen)]
        organs += [("kidney", blob) for blob in self.kidneys]
        for name, blob in organs:
            mask = blob.inside(points) & inner
            hu[mask] = HU[name]
            label[mask] = LABELS[name]
        column = ((x - self.spine_xy[0]) / self.spine_semi[0]) ** 2 + ((y - self.spine_xy[1]) / self.spine_semi[1]) ** 2
        disc = np.mod(z - self.disc_offset_mm, self.disc_period_mm) < 5.0
        bone = (column < 1) & ~disc
        hu[bone] = np.where(column[bone] > 0.6, HU["bone_cortex"], HU["bone_marrow"])
        label[bone] = LABELS["bone"]
        hu[(column < 1) & disc] = HU["disc"]
        label[(column < 1) & disc] = 0
        return hu, label

    def bias(self, points: np.ndarray, hu: np.ndarray) -> np.ndarray:
        """Apply the smooth world-defined bias: ``(HU + 1000) * (1 + g sin) - 1000 + o cos``."""
        gain = 1.0 + self.bias_gain * np.sin(self.bias_waves[0] @ points + self.bias_phases[0])
        offset = self.bias_offset_hu * np.cos(self.bias_waves[1] @ points + self.bias_phases[1])
        return ((hu + 1000.0) * gain - 1000.0 + offset).astype(np.float32)


def make_phantom(
    rng_or_seed: np.random.Generator | int,
    shape: tuple[int, int, int] = (64, 64, 32),
    spacing: tuple[float, float, float] = (1.6, 1.6, 2.5),
    orientation: str = "RAS",
    oblique_degrees: float = 0.0,
    oblique_axis: tuple[float, float, float] = (1.0, 0.0, 0.0),
    noise_hu: float = 20.0,
    psf_mm: float = 0.8,
    bias: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample one random phantom on a grid; the anatomy depends only on the seed, not on the grid.

    The anatomy is drawn first from the generator, so two calls with the same seed and different ``orientation``,
    ``oblique_degrees`` or spacing describe the same physical body (labels agree at every world point). The body is
    about 88 x 64 mm across (x, y) with organs within |z| < 30 mm, so the default grid (102 x 102 x 80 mm) holds it.

    Args:
        rng_or_seed: a seed, or a generator (which is advanced).
        shape: array shape (voxels) in array order.
        spacing: voxel size (mm) along each array axis.
        orientation: axcodes of the array axes, e.g. ``"RAS"``, ``"LPS"``, ``"LIA"``.
        oblique_degrees: rotation of the grid about the world ``oblique_axis`` (deg).
        oblique_axis: world axis of the oblique rotation.
        noise_hu: standard deviation of the Gaussian noise (HU).
        psf_mm: standard deviation of the Gaussian point-spread blur (mm).
        bias: apply the smooth multiplicative/additive bias field.

    Returns:
        ``(image, label, affine)``: float32 HU array, uint8 label array (values of :data:`LABELS`), and the 4x4
        voxel-to-world affine (RAS+ mm).
    """
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    anatomy = _Anatomy.draw(rng)
    affine = phantom_affine(shape, spacing, orientation, oblique_degrees, oblique_axis)
    i, j, k = (np.arange(n, dtype=np.float64) for n in shape)
    points = np.stack(
        [
            (a[0] * i[:, None, None] + a[1] * j[None, :, None] + a[2] * k[None, None, :] + a[3]).ravel()
            for a in affine[:3]
        ]
    )  # (3, N) world mm of every voxel centre, in C order
    hu, label = anatomy.evaluate(points)
    if bias:
        hu = anatomy.bias(points, hu)
    image = hu.reshape(shape)
    if psf_mm > 0:
        image = ndimage.gaussian_filter(image, sigma=[psf_mm / s for s in spacing], mode="nearest")
    image = image + rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    return image.astype(np.float32), label.reshape(shape), affine


def _case_geometry(rng: np.random.Generator, index: int, shape, reorient: bool, oblique: bool) -> dict:
    """Per-case grid: 100-115 mm in-plane field of view, slices 1.6-2.4x thicker than the in-plane spacing."""
    if shape is None:
        in_plane = int(rng.choice([64, 80, 96]))
        world_shape = (in_plane, in_plane, int(rng.choice([32, 40, 48])))
    else:
        world_shape = None
    fov = rng.uniform(100.0, 115.0)
    anisotropy = rng.uniform(1.6, 2.4)  # slice thickness / in-plane spacing, as in clinical CT
    code = _CASE_ORIENTATIONS[index % len(_CASE_ORIENTATIONS)] if reorient else "RAS"
    order = [_AXES[c][0] for c in code]  # world axis of each array axis
    if world_shape is None:
        array_shape = tuple(int(n) for n in shape)
        world_shape = tuple(array_shape[order.index(w)] for w in range(3))
    in_plane_mm = fov / world_shape[0]
    world_spacing = (in_plane_mm, in_plane_mm, in_plane_mm * anisotropy)
    tilt = rng.uniform(5.0, 15.0) * rng.choice([-1, 1]) if oblique and index % 3 == 2 else 0.0
    return {
        "shape": tuple(int(world_shape[w]) for w in order),
        "spacing": tuple(float(world_spacing[w]) for w in order),
        "orientation": code,
        "oblique_degrees": float(tilt),
        "oblique_axis": tuple(float(v) for v in rng.normal(size=3)),
    }


def build(
    root: str | os.PathLike[str],
    seed: int = 0,
    num_train: int = 12,
    num_test: int = 4,
    shape: tuple[int, int, int] | None = None,
    reorient: bool = True,
    oblique: bool = True,
    force: bool = False,
) -> Path:
    """Write ``root/Dataset990_Synthetic`` (nnU-Net v2 raw layout) atomically and return its path.

    Args:
        root: folder of datasets (``$MEDSEG_DATA``).
        seed: the whole dataset is a deterministic function of the seed and options.
        num_train: cases in ``imagesTr``/``labelsTr``.
        num_test: held-out cases in ``imagesTs``/``labelsTs``.
        shape: fixed array shape for every case; default: random per case, 64-96 in-plane x 32-48 slices.
        reorient: store some cases as LPS, LAS or permuted LIA instead of RAS.
        oblique: give every third case a 5-15 degree rotated (oblique) affine.
        force: replace an existing dataset (otherwise :class:`~medseg.errors.DatasetError`).
    """
    if num_train < 1 or num_test < 0:
        raise ConfigError(f"num_train must be >= 1 and num_test >= 0 (got {num_train}, {num_test}).")
    final = Path(root) / DATASET_NAME
    with building_dataset(final, force=force) as work:
        for index in range(num_train + num_test):
            rng = np.random.default_rng([seed, index])
            geometry = _case_geometry(rng, index, shape, reorient, oblique)
            image, label, affine = make_phantom(rng, **geometry)
            images, label_path = case_paths(work, f"phantom_{index:03d}", 1, test=index >= num_train)
            write_nifti(np.clip(np.rint(image), -1024, 3071), affine, images[0], dtype=np.int16)
            write_nifti(label, affine, label_path, dtype=np.uint8)
        write_dataset_json(
            work,
            channel_names={0: "CT"},
            labels=LABELS,
            num_training=num_train,
            name="Synthetic",
            description="Synthetic abdominal CT phantoms (HU) with liver, kidneys, spleen and vertebral bone; "
            "anisotropic spacing, non-RAS and oblique affines on some cases. Built by medseg (seed "
            f"{seed}); see datasets/synthetic.md.",
            licence="CC0-1.0 (generated data)",
            numTest=num_test,
        )
        write_demo_folds(work, NUM_FOLDS)
    return final
