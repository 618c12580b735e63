"""CT/MRI intensity presets, 2D slice sampling and the transform plumbing MONAI leaves to the user.

Pipelines themselves are written as data in ``conf/data/`` (lists of MONAI dictionary transforms with ``_target_``),
split into a *deterministic* list, which a CacheDataset or PersistentDataset may cache, and a *random* list, which
runs every epoch. This module holds the few transforms MONAI lacks (named HU windows, percentile clip + z-score over
the foreground, positive-biased slice sampling for 2D backbones) and the key that invalidates a persistent cache when
the deterministic configuration changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from collections.abc import Hashable, Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import monai
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, get_track_meta
from monai.transforms import MapTransform, Randomizable, ScaleIntensityRanged, Spacingd
from omegaconf import DictConfig, ListConfig, OmegaConf

from medseg.config import instantiate
from medseg.errors import ConfigError

__all__ = [
    "CT_WINDOWS",
    "CTWindowd",
    "ForegroundZScored",
    "RandSliced",
    "above",
    "build_transforms",
    "resolve_window",
    "spacing_of",
    "target_spacing",
    "transform_cache_key",
]

# (level, width) in HU. Radiology conventions; "soft_tissue" is the mediastinal window.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft_tissue": (50.0, 350.0),
    "liver": (60.0, 160.0),
}


def resolve_window(window: str | Sequence[float]) -> tuple[float, float]:
    """``(level, width)`` in HU from a preset name, an explicit pair, or ``"L:W"`` (as ``--window`` takes it)."""
    if isinstance(window, str):
        if window in CT_WINDOWS:
            return CT_WINDOWS[window]
        if ":" in window:
            level, width = window.split(":", 1)
            return float(level), float(width)
        raise ConfigError(f"Unknown CT window {window!r}. Use one of {', '.join(CT_WINDOWS)} or 'LEVEL:WIDTH' in HU.")
    level, width = (float(v) for v in window)
    if width <= 0:
        raise ConfigError(f"CT window width must be positive, got {width} HU.")
    return level, width


class CTWindowd(ScaleIntensityRanged):
    """Clip HU to a named window and scale it to ``[b_min, b_max]`` (default [0, 1]).

    A thin named-window front to MONAI's ``ScaleIntensityRanged``, so configs say ``window: lung`` instead of
    repeating HU limits.
    """

    def __init__(
        self,
        keys: KeysCollection,
        window: str | Sequence[float] = "abdomen",
        b_min: float = 0.0,
        b_max: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        level, width = resolve_window(window)
        self.window = (level, width)
        super().__init__(
            keys, a_min=level - width / 2, a_max=level + width / 2, b_min=b_min, b_max=b_max, clip=True,
            allow_missing_keys=allow_missing_keys,
        )  # fmt: skip


class ForegroundZScored(MapTransform):
    """MRI normalisation: clip each channel to percentiles of its foreground, then z-score over the foreground.

    MRI intensities have no physical unit, and background air dominates a head volume, so statistics over all
    voxels would be meaningless. The foreground is ``x > threshold`` (for skull-stripped or template data the
    default 0 is right). ``mode="minmax"`` scales the clipped range to [0, 1] instead, as MedSAM does for MR.
    """

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        threshold: float = 0.0,
        mode: str = "zscore",
        background: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in {"zscore", "minmax"}:
            raise ConfigError(f"ForegroundZScored mode must be 'zscore' or 'minmax', got {mode!r}.")
        if not 0 <= lower < upper <= 100:
            raise ConfigError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}.")
        self.lower, self.upper, self.threshold, self.mode, self.background = lower, upper, threshold, mode, background

    def _normalise(self, channel: torch.Tensor) -> torch.Tensor:
        mask = channel > self.threshold
        values = channel[mask] if bool(mask.any()) else channel.reshape(-1)
        q = torch.tensor([self.lower / 100, self.upper / 100], dtype=torch.float64)
        lo, hi = torch.quantile(values.double()[:16_000_000], q).tolist()
        out = channel.clamp(lo, hi)
        if self.mode == "minmax":
            out = (out - lo) / max(hi - lo, 1e-8)
        else:
            clipped = values.clamp(lo, hi)
            out = (out - clipped.mean()) / clipped.std().clamp_min(1e-8)
        if self.background is not None:
            out = torch.where(mask, out, torch.as_tensor(self.background, dtype=out.dtype))
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            normalised = torch.stack([self._normalise(c) for c in torch.as_tensor(image).float()])
            if isinstance(image, MetaTensor):  # keep the geometry and the trace that inversion replays
                normalised = MetaTensor(normalised, meta=image.meta, applied_operations=image.applied_operations)
            d[key] = normalised
        return d


def above(x: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Foreground selector for ``CropForegroundd(select_fn=...)``; use it in configs with ``_partial_: true``."""
    return x > threshold


class RandSliced(Randomizable, MapTransform):
    """Draw 2D slices along one axis of a 3D sample, biased toward slices that contain foreground.

    2D backbones (SAM, LiteMedSAM, DINOv2) train on slices of volumes that were resampled and normalised in 3D. A
    slice is drawn from those with ``label > 0`` with probability ``pos_fraction``, else uniformly, so rare organs
    are seen often without never seeing empty slices.

    Each output is a dict with ``(C, H, W)`` tensors and ``slice_axis``/``slice_index`` (into the resampled volume).
    The 2D affine keeps the in-plane rows and columns of the 3D affine, so in-plane spacing stays meaningful; with
    MONAI's metadata tracking off (training samples, :class:`medseg.data.sampling.SeededSamples`) the slices are plain
    tensors. Only the drawn slices are copied, never the volume, which is left untouched.

    Args:
        keys: keys to slice (image and label).
        label_key: key whose foreground biases the choice; ``None`` for uniform slices.
        axis: spatial axis (0, 1 or 2; 2 is axial after ``Orientationd("RAS")``).
        num_samples: slices drawn per volume.
        pos_fraction: probability of drawing a foreground slice.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str | None = "label",
        axis: int = 2,
        num_samples: int = 4,
        pos_fraction: float = 0.8,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if axis not in (0, 1, 2):
            raise ConfigError(f"RandSliced axis must be 0, 1 or 2 (a spatial axis), got {axis}.")
        if not 0 <= pos_fraction <= 1:
            raise ConfigError(f"RandSliced pos_fraction must be in [0, 1], got {pos_fraction}.")
        self.label_key, self.axis, self.num_samples, self.pos_fraction = label_key, axis, num_samples, pos_fraction
        self._indices: list[int] = []
        self._foreground_of: dict[int, tuple[weakref.ref, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (spawned workers, copies) without the memo of foreground slices: weak references do not pickle,
        and the tensors they point to are not the copy's."""
        state = dict(self.__dict__)
        state["_foreground_of"] = {}
        return state

    def randomize(self, depth: int, foreground: np.ndarray) -> None:
        self._indices = []
        for _ in range(self.num_samples):
            if foreground.size and self.R.rand() < self.pos_fraction:
                self._indices.append(int(self.R.choice(foreground)))
            else:
                self._indices.append(int(self.R.randint(depth)))

    def _foreground(self, label: Any) -> np.ndarray:
        """Indices of the slices along :attr:`axis` that hold foreground, computed once per label tensor object: the
        same cached label comes back every time its case is drawn, and this is a pass over the whole volume."""
        key = id(label)
        entry = self._foreground_of.get(key)
        if entry is not None and entry[0]() is label:
            return entry[1]
        volume = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
        other = [a + 1 for a in range(3) if a != self.axis] + [0]
        found = torch.nonzero(volume.ne(0).any(dim=tuple(other))).flatten().numpy()
        with contextlib.suppress(TypeError):  # e.g. a NumPy array takes no weak reference: computed every time
            forget = self._foreground_of.pop
            self._foreground_of[key] = (weakref.ref(label, lambda _, key=key: forget(key, None)), found)
        return found

    def _slice(self, value: torch.Tensor, index: int) -> torch.Tensor:
        """One slice, copied (a view would keep the whole volume alive, and move it whole to another process)."""
        plain = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
        tensor = plain.select(self.axis + 1, index).clone()
        if not isinstance(value, MetaTensor) or not get_track_meta():  # training samples carry no metadata
            return tensor
        keep = [a for a in range(3) if a != self.axis]
        affine3d = torch.as_tensor(value.affine, dtype=torch.float64)
        affine2d = torch.eye(3, dtype=torch.float64)
        affine2d[:2, :2] = affine3d[keep][:, keep]
        affine2d[:2, 2] = affine3d[keep, 3]
        meta = {k: v for k, v in value.meta.items() if k not in {"affine", "original_affine", "spatial_shape"}}
        return MetaTensor(tensor, affine=affine2d, meta=meta)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        first = next(iter(self.key_iterator(d)))
        depth = d[first].shape[self.axis + 1]
        foreground = np.array([], dtype=int)
        if self.label_key is not None and self.label_key in d:
            foreground = self._foreground(d[self.label_key])
        self.randomize(depth, foreground)
        samples = []
        for index in self._indices:
            sample = dict(d)
            for key in self.key_iterator(d):
                sample[key] = self._slice(d[key], index)
            sample["slice_axis"], sample["slice_index"] = self.axis, index
            samples.append(sample)
        return samples


def build_transforms(items: Iterable[Any] | None) -> list[Any]:
    """Instantiate a list of transform configs (mappings with ``_target_``); objects already built pass through."""
    built = []
    for item in items or []:
        if isinstance(item, DictConfig | Mapping):
            config = item if isinstance(item, DictConfig) else OmegaConf.create(dict(item))
            if "_target_" not in config:
                raise ConfigError(f"transform config {OmegaConf.to_container(config)} has no _target_.")
            built.append(instantiate(config, _convert_="all"))
        else:
            built.append(item)
    return built


def _medseg_version() -> str:
    """The installed medseg's version (pyproject.toml's, which ``medseg.__version__`` repeats), read from the package
    metadata rather than the ``medseg`` package, which the data stage must not import."""
    try:
        return version("medseg")
    except PackageNotFoundError:  # a source tree that was never installed: caches are keyed without the version
        return "unknown"


def transform_cache_key(config: Any, *extra: Any) -> str:
    """Stable hash of a deterministic-transform config (plus e.g. the resolved target spacing).

    A persistent cache stored under this key is never reused after the deterministic part of the pipeline changes;
    MONAI's own ``PersistentDataset`` key covers the input file names only.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
        return value

    payload = json.dumps(
        {"config": plain(config), "extra": [plain(e) for e in extra], "monai": monai.__version__,
         "medseg": _medseg_version()},
        sort_keys=True, default=repr,
    )  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def spacing_of(preprocessing: Any) -> tuple[float, ...] | None:
    """The voxel size (mm, RAS order) a deterministic transform resamples to: its ``Spacingd``'s ``pixdim``, or
    ``None`` when it does not resample."""
    for transform in getattr(preprocessing, "transforms", ()):
        if isinstance(transform, Spacingd):
            return tuple(float(s) for s in transform.spacing_transform.pixdim)
    return None


def target_spacing(datamodule: Any) -> tuple[float, ...] | None:
    """The voxel size (mm, RAS order) a run's datamodule resamples to (``None``: no resampling)."""
    if getattr(datamodule, "target_spacing", None) is not None:
        return tuple(float(s) for s in datamodule.target_spacing)
    return spacing_of(datamodule.deterministic_transform)
