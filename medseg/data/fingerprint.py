"""The dataset fingerprint: what nnU-Net measures before planning, to choose target spacing and normalisation.

The fingerprint holds each training case's voxel spacing and shape after reorientation to RAS (the axis order and
signs of :func:`nibabel.as_closest_canonical`, so that "axis 2" means the same body axis in every case, whatever the
scanner's storage order), their medians, per-channel intensity statistics over foreground voxels (label > 0), and the
voxel count of every label value.

As in nnU-Net's ``DatasetFingerprintExtractor``, intensities are sampled (at most ``max_samples_per_case`` foreground
voxels per case, seeded) so that the statistics cost little memory on large datasets; min and max are exact.

Computing it reads every training case once, so :func:`load_or_compute_fingerprint` caches it next to the data in
``medseg_fingerprint.json``, keyed by the names, sizes and modification times of the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from rich.table import Table

from medseg.atomic import atomic_write_json
from medseg.console import wide_console
from medseg.data.checks import open_image
from medseg.data.formats import DATASET_JSON, DatasetInfo
from medseg.errors import DatasetError, ReaderError

__all__ = [
    "CACHE_NAME",
    "Fingerprint",
    "compute_fingerprint",
    "load_or_compute_fingerprint",
    "print_dataset_summary",
    "ras_spacing_and_shape",
]

CACHE_NAME = "medseg_fingerprint.json"
_CACHE_VERSION = 1
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fingerprint:
    """Geometry and intensity statistics of a dataset's training cases.

    Attributes:
        median_spacing: Median voxel spacing per RAS axis, in mm (the usual target spacing).
        median_shape: Median shape per RAS axis, in voxels, rounded to integers.
        spacings: Every case's spacing (mm, RAS axis order), in case order.
        shapes: Every case's shape (voxels, RAS axis order), in case order.
        intensity: Channel -> statistics of foreground voxels: ``mean``, ``std``, ``median``, ``p00_5``, ``p99_5``
            (the 0.5th and 99.5th percentiles nnU-Net clips CT to), ``min``, ``max``; in the image's units (HU for CT).
        label_voxels: Label value -> number of voxels over all training labels (background included).
        num_cases: Number of training cases measured.
    """

    median_spacing: tuple[float, float, float]
    median_shape: tuple[int, int, int]
    spacings: list[tuple[float, float, float]]
    shapes: list[tuple[int, int, int]]
    intensity: dict[int, dict[str, float]]
    label_voxels: dict[int, int]
    num_cases: int

    def to_json(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The fingerprint as a JSON-ready dict (string keys); also written atomically to ``path`` when given."""
        data = asdict(self)
        data["median_spacing"], data["median_shape"] = list(self.median_spacing), list(self.median_shape)
        data["spacings"], data["shapes"] = [list(s) for s in self.spacings], [list(s) for s in self.shapes]
        data["intensity"] = {str(c): stats for c, stats in self.intensity.items()}
        data["label_voxels"] = {str(v): n for v, n in self.label_voxels.items()}
        if path is not None:
            atomic_write_json(Path(path), data)
        return data

    @classmethod
    def from_json(cls, source: dict[str, Any] | str | os.PathLike[str]) -> Fingerprint:
        """Rebuild a fingerprint from :meth:`to_json`'s dict or the file it wrote."""
        data = source if isinstance(source, dict) else json.loads(Path(source).read_text(encoding="utf-8"))
        return cls(
            median_spacing=tuple(float(v) for v in data["median_spacing"]),
            median_shape=tuple(int(v) for v in data["median_shape"]),
            spacings=[tuple(float(v) for v in s) for s in data["spacings"]],
            shapes=[tuple(int(v) for v in s) for s in data["shapes"]],
            intensity={int(c): {k: float(v) for k, v in s.items()} for c, s in data["intensity"].items()},
            label_voxels={int(v): int(n) for v, n in data["label_voxels"].items()},
            num_cases=int(data["num_cases"]),
        )


def ras_spacing_and_shape(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Spacing (mm) and shape (voxels) of the first three axes after :func:`nibabel.as_closest_canonical`.

    Computed from the header alone: the axis permutation of :func:`nibabel.io_orientation`, applied to the voxel
    sizes (affine column norms) and the shape.
    """
    orientation = nib.io_orientation(affine)
    spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    ras_spacing, ras_shape = [0.0] * 3, [0] * 3
    for axis, (target, _) in enumerate(orientation):
        ras_spacing[int(target)] = float(spacing[axis])
        ras_shape[int(target)] = int(shape[axis])
    return tuple(ras_spacing), tuple(ras_shape)


def _read(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    try:
        image = open_image(path)
        return image, np.asanyarray(image.dataobj)
    except Exception as err:
        raise ReaderError(
            f"{path}: cannot be read ({err}). Run `medseg validate` on the dataset to list problems."
        ) from err


def compute_fingerprint(info: DatasetInfo, max_samples_per_case: int = 10_000, seed: int = 0) -> Fingerprint:
    """Measure every training case (reads each once; see the module docstring).

    Args:
        info: The dataset, from :func:`medseg.data.formats.load_dataset_info`.
        max_samples_per_case: Foreground voxels sampled per case for the intensity statistics (all when fewer).
        seed: Seed of the sampling, so that the fingerprint is reproducible.

    Raises:
        DatasetError: a training case lacks its label or a channel, its label and image grids differ, or no label
            has foreground; the message says to run ``medseg validate``.
        ReaderError: a file cannot be read.
    """
    if not info.training:
        raise DatasetError(f"{info.root}: no training cases found in imagesTr/. Run `medseg validate {info.root}`.")
    spacings, shapes = [], []
    samples: dict[int, list[np.ndarray]] = {c: [] for c in info.channel_names}
    extremes: dict[int, list[float]] = {c: [np.inf, -np.inf] for c in info.channel_names}
    label_voxels: Counter[int] = Counter()
    expected_files = 1 if info.layout == "msd" else info.num_channels
    for index, case in enumerate(info.training):
        if case.label is None or len(case.images) != expected_files:
            raise DatasetError(
                f"{info.root}: training case '{case.case_id}' lacks its label or a channel file. "
                f"Run `medseg validate {info.root}` and fix the problems it lists."
            )
        label_image, label = _read(case.label)
        spacing, shape = ras_spacing_and_shape(label_image.affine, label.shape)
        spacings.append(spacing)
        shapes.append(shape)
        values, counts = np.unique(label, return_counts=True)
        label_voxels.update({int(v): int(n) for v, n in zip(values, counts)})
        foreground = label > 0
        count = int(foreground.sum())
        rng = np.random.default_rng([seed, index])
        chosen = (
            np.sort(rng.choice(count, max_samples_per_case, replace=False)) if count > max_samples_per_case else None
        )
        for channel, volume in _channels(case.images, info.num_channels):
            if volume.shape[:3] != label.shape:
                raise DatasetError(
                    f"{case.label}: shape {label.shape} differs from its image's {volume.shape[:3]}. "
                    f"Run `medseg validate {info.root}`."
                )
            voxels = volume[foreground].astype(np.float64)
            if voxels.size:
                extremes[channel] = [min(extremes[channel][0], voxels.min()), max(extremes[channel][1], voxels.max())]
                samples[channel].append(voxels if chosen is None else voxels[chosen])
    if not any(len(s) for s in samples.values()):
        raise DatasetError(
            f"{info.root}: no training label has foreground voxels (label > 0), so intensities cannot be measured. "
            f"Check labelsTr/ (`medseg validate {info.root}`)."
        )
    intensity = {c: _statistics(np.concatenate(samples[c]), *extremes[c]) for c in info.channel_names}
    return Fingerprint(
        median_spacing=tuple(float(v) for v in np.median(np.asarray(spacings), axis=0)),
        median_shape=tuple(int(v) for v in np.rint(np.median(np.asarray(shapes), axis=0))),
        spacings=spacings,
        shapes=shapes,
        intensity=intensity,
        label_voxels=dict(sorted(label_voxels.items())),
        num_cases=len(info.training),
    )


def _channels(images: tuple[Path, ...], num_channels: int):
    """``(channel, 3D array)`` for one file per channel (nnU-Net) or one 4D file with channels last (MSD)."""
    if len(images) == 1 and num_channels > 1:
        _, data = _read(images[0])
        for channel in range(num_channels):
            yield channel, data[..., channel]
        return
    for channel, path in enumerate(images):
        yield channel, _read(path)[1]


def _statistics(values: np.ndarray, minimum: float, maximum: float) -> dict[str, float]:
    p00_5, median, p99_5 = np.percentile(values, [0.5, 50.0, 99.5])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(median),
        "p00_5": float(p00_5),
        "p99_5": float(p99_5),
        "min": float(minimum),
        "max": float(maximum),
    }


def _cache_key(info: DatasetInfo, max_samples_per_case: int, seed: int) -> str:
    files = [info.root / DATASET_JSON]
    for case in info.training:
        files += [*case.images, *([case.label] if case.label else [])]
    entries = []
    for path in files:
        stat = path.stat()
        entries.append([str(path.relative_to(info.root)), stat.st_size, stat.st_mtime_ns])
    payload = json.dumps([_CACHE_VERSION, max_samples_per_case, seed, entries])
    return hashlib.sha256(payload.encode()).hexdigest()


def load_or_compute_fingerprint(info: DatasetInfo, max_samples_per_case: int = 10_000, seed: int = 0) -> Fingerprint:
    """The cached fingerprint in ``<dataset>/medseg_fingerprint.json``, recomputed when any training file changed.

    The cache key hashes every training file's name, size and modification time (and ``dataset.json``), like
    micro-sam's embedding cache signature: cheap to check, and any rewrite of a file invalidates it. A read-only
    dataset folder only costs the caching (a warning is logged).
    """
    cache = info.root / CACHE_NAME
    key = _cache_key(info, max_samples_per_case, seed)
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text(encoding="utf-8"))
            if stored.get("key") == key:
                return Fingerprint.from_json(stored["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            _log.warning("Ignoring unreadable fingerprint cache %s (%s); recomputing.", cache, err)
    fingerprint = compute_fingerprint(info, max_samples_per_case=max_samples_per_case, seed=seed)
    try:
        atomic_write_json(cache, {"key": key, "version": _CACHE_VERSION, "fingerprint": fingerprint.to_json()})
    except OSError as err:
        _log.warning("Could not cache the fingerprint in %s (%s); it will be recomputed next time.", cache, err)
    return fingerprint


def print_dataset_summary(info: DatasetInfo, fingerprint: Fingerprint, console=None) -> None:
    """Print a table of the dataset for a human: channels, labels with voxel share, cases, geometry, intensities.

    Args:
        info: The dataset.
        fingerprint: Its fingerprint.
        console: A :class:`rich.console.Console`; a new one on stdout when ``None``.
    """
    console = console or wide_console()
    total = sum(fingerprint.label_voxels.values()) or 1
    label_lines = [
        f"{value} {name}: {100.0 * fingerprint.label_voxels.get(value, 0) / total:.2f} % of voxels"
        for name, value in info.labels.items()
    ]
    spacing = np.asarray(fingerprint.spacings)
    intensity_lines = []
    for channel, name in info.channel_names.items():
        s = fingerprint.intensity[channel]
        intensity_lines.append(f"{channel} {name}: [{s['p00_5']:.4g}, {s['p99_5']:.4g}] (0.5-99.5 %)")
        intensity_lines.append(f"  mean {s['mean']:.4g} ± {s['std']:.4g}, min {s['min']:.4g}, max {s['max']:.4g}")
    table = Table(title=f"Dataset {info.name}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("layout", info.layout)
    table.add_row("channels", ", ".join(f"{c} {n}" for c, n in info.channel_names.items()))
    table.add_row("labels", "\n".join(label_lines))
    table.add_row("cases", f"{len(info.training)} training, {len(info.test)} test")
    table.add_row("median shape", " × ".join(map(str, fingerprint.median_shape)) + " voxels (RAS)")
    table.add_row("median spacing", " × ".join(f"{v:.3g}" for v in fingerprint.median_spacing) + " mm (RAS)")
    table.add_row(
        "spacing range",
        " × ".join(f"{lo:.3g}-{hi:.3g}" for lo, hi in zip(spacing.min(axis=0), spacing.max(axis=0))) + " mm",
    )
    table.add_row("foreground intensity", "\n".join(intensity_lines))
    console.print(table)
