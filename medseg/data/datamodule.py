"""The LightningDataModule that turns an nnU-Net/MSD dataset folder into train, validation and test batches.

It owns the decisions that make comparisons fair and runs reproducible: which cases are in which fold
(``splits_final.json``), which training cases a label budget keeps (nested, seeded), what is cached (only the
deterministic transforms, under a key that changes with their config), and that validation and test cases are
whole volumes whose transforms can be inverted onto the native grid.

It also keeps the data path off the critical path of training: each case is preprocessed once (in memory or on
disk, ``cache: auto`` choosing by size), training samples are drawn from the cached arrays without copying them and
without MONAI's metadata tracking, seeded per sample so that any number of (persistent) workers gives the same
batches, and the loader settings default to what the machine supports (:mod:`medseg.data.loader_settings`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose, Randomizable, RandomizableTransform

from medseg.data.fingerprint import load_or_compute_fingerprint
from medseg.data.formats import CaseFiles, DatasetInfo, load_dataset_info
from medseg.data.io import LoadCased
from medseg.data.loader_settings import AUTO, LoaderSettings, cached_bytes, choose_cache, resolve_loader_settings
from medseg.data.memory import available_bytes
from medseg.data.sampling import EpochDataLoader, EpochSeededSampler, SeededSamples
from medseg.data.splits import label_fraction_subset, load_or_create_splits
from medseg.data.transforms import build_transforms, transform_cache_key
from medseg.errors import ConfigError
from medseg.paths import find_dataset

__all__ = ["SegmentationDataModule", "resolve_median_spacing", "split_random"]

_CACHE_MODES = ("none", "memory", "disk", AUTO)


def resolve_median_spacing(configs: Sequence[Any], info: DatasetInfo) -> tuple[list[Any], tuple[float, ...] | None]:
    """Replace ``pixdim: median`` in transform configs by the dataset fingerprint's median spacing (mm, RAS order).

    Returns the configs (copied where changed) and the spacing used, or ``None`` when no config asked for it.
    """
    resolved, spacing = [], None
    for config in configs:
        if isinstance(config, Mapping) and str(config.get("pixdim", "")) == "median":
            spacing = tuple(float(s) for s in load_or_compute_fingerprint(info).median_spacing)
            config = copy.deepcopy(dict(config))
            config["pixdim"] = list(spacing)
        resolved.append(config)
    return resolved, spacing


def _transform_list(node: Sequence[Any] | Mapping[str, Any] | None) -> list[Any]:
    if node is None:
        return []
    if isinstance(node, Mapping):
        if "transforms" not in node:
            raise ConfigError(f"a transform group needs a 'transforms' list, got keys {sorted(node)}.")
        node = node["transforms"] or []
    return list(node)


def _never_applied(transform: Any) -> bool:
    """A random transform at probability 0. It is left out rather than run: MONAI's elastic transforms still resample
    every sample through an identity grid when they are off (the largest cost of a 2-D training sample, measured)."""
    return isinstance(transform, RandomizableTransform) and float(transform.prob) == 0.0


def split_random(transforms: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``(head, rest)``: the leading transforms that are not random (e.g. the padding before a patch crop), which
    may be cached with the case, and the random rest from the first random transform on, without those at
    probability 0."""
    transforms = list(transforms)
    first = next((i for i, t in enumerate(transforms) if isinstance(t, Randomizable)), len(transforms))
    return transforms[:first], [t for t in transforms[first:] if not _never_applied(t)]


def _items(cases: Sequence[CaseFiles]) -> list[dict[str, Any]]:
    items = []
    for case in cases:
        item: dict[str, Any] = {"image": [str(p) for p in case.images], "case_id": case.case_id}
        if case.label is not None:
            item["label"] = str(case.label)
        items.append(item)
    return items


class SegmentationDataModule(L.LightningDataModule):
    """Dataset folder -> batches of ``{"image", "label", "case_id", ...}``.

    Args:
        dataset: path, ``DatasetNNN_Name``, ID or short name (resolved in ``$MEDSEG_DATA`` or ``data_root``).
        fold: cross-validation fold whose ``val`` cases are held out for validation.
        num_folds, split_seed: used only when ``splits_final.json`` does not exist yet.
        label_fraction: fraction of the fold's training cases to train on (nested across fractions).
        fraction_seed: seed of the label-fraction permutation (a benchmark's seeds vary it).
        preprocess: deterministic transform configs (``_target_`` mappings), applied once and cacheable;
            ``pixdim: median`` in a ``Spacingd`` takes the dataset's median spacing. ``LoadCased`` is prepended.
            A list, or a config group node holding the list under ``transforms`` (``conf/data/preprocess/*.yaml``).
        sampling: random transforms that draw training samples (3D patches or 2D slices), run every epoch.
        augment: random augmentations, run every epoch after sampling.
        batch_size: training batch size (for 2D slice sampling: volumes per batch, times ``num_samples``).
        num_workers, persistent_workers, pin_memory, prefetch_factor: DataLoader settings; ``auto`` chooses from the
            machine and the training device (:func:`medseg.data.loader_settings.resolve_loader_settings`).
        cache: ``none``, ``memory`` (CacheDataset), ``disk`` (PersistentDataset under ``cache_dir/<key>``) or
            ``auto`` (memory when the preprocessed training and validation cases fit comfortably, else disk).
        cache_dir: folder for the disk cache (default ``<dataset>/.medseg_cache``).
        data_root: folder of datasets, overriding ``$MEDSEG_DATA``.
        seed: seed of the training order and augmentation: each sample's from ``(seed, epoch, case)``
            (see :mod:`medseg.data.sampling`).
    """

    def __init__(
        self,
        dataset: str,
        fold: int = 0,
        num_folds: int = 5,
        split_seed: int = 12345,
        label_fraction: float = 1.0,
        fraction_seed: int = 0,
        preprocess: Sequence[Any] | Mapping[str, Any] = (),
        sampling: Sequence[Any] | Mapping[str, Any] = (),
        augment: Sequence[Any] | Mapping[str, Any] = (),
        batch_size: int = 2,
        num_workers: int | str = AUTO,
        cache: str = "memory",
        cache_dir: str | None = None,
        data_root: str | None = None,
        pin_memory: bool | str = AUTO,
        seed: int = 0,
        persistent_workers: bool | str = AUTO,
        prefetch_factor: int | str = AUTO,
    ) -> None:
        super().__init__()
        if cache not in _CACHE_MODES:
            raise ConfigError(f"data.cache must be one of {_CACHE_MODES}, got {cache!r}.")
        self.dataset, self.fold, self.num_folds, self.split_seed = dataset, fold, num_folds, split_seed
        self.label_fraction, self.fraction_seed = label_fraction, fraction_seed
        self.deterministic_config = _transform_list(preprocess)
        self.random_config = _transform_list(sampling) + _transform_list(augment)
        self.batch_size, self.seed = batch_size, seed
        self.loader_config = {
            "num_workers": num_workers, "persistent_workers": persistent_workers, "pin_memory": pin_memory,
            "prefetch_factor": prefetch_factor,
        }  # fmt: skip
        resolve_loader_settings(**self.loader_config, cuda=False)  # a malformed value fails here, not at fit time
        self.cache, self.cache_dir = cache, cache_dir
        self._cache_mode: str | None = None if cache == AUTO else cache
        self._train_head_key: list[Any] = []
        self.info = load_dataset_info(find_dataset(dataset, Path(data_root) if data_root else None))
        self.target_spacing: tuple[float, ...] | None = None
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []
        self.test_ids: list[str] = []
        self._datasets: dict[str, Any] = {}

    # What models need to know about the data, available before setup().
    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def num_channels(self) -> int:
        return self.info.num_channels

    @property
    def label_names(self) -> dict[str, int]:
        return dict(self.info.labels)

    def split(self) -> None:
        """Decide the fold's training (label-fraction subset), validation and test case IDs, reading no image.

        Public so that runners that train elsewhere (the nnU-Net arm) use exactly this split.
        """
        training = {c.case_id: c for c in self.info.training}
        splits = load_or_create_splits(self.info.root, sorted(training), self.num_folds, self.split_seed)
        if not 0 <= self.fold < len(splits):
            raise ConfigError(f"data.fold={self.fold} but {self.info.root}/splits_final.json has {len(splits)} folds.")
        self.train_ids = label_fraction_subset(splits[self.fold]["train"], self.label_fraction, self.fraction_seed)
        self.val_ids = list(splits[self.fold]["val"])
        self.test_ids = [c.case_id for c in self.info.test]

    def _cases(self, ids: Sequence[str], test: bool = False) -> list[CaseFiles]:
        pool = {c.case_id: c for c in (self.info.test if test else self.info.training)}
        return [pool[i] for i in ids]

    def build_deterministic(self) -> Compose:
        """Load + the deterministic transforms. Keep this instance to invert predictions with ``Invertd``."""
        configs, self.target_spacing = resolve_median_spacing(self.deterministic_config, self.info)
        self._resolved_deterministic = configs
        return Compose([LoadCased(keys=["image", "label"], allow_missing_keys=True), *build_transforms(configs)])

    def _processes(self) -> int:
        """Training processes on this node (DDP ranks), which share its CPUs and each hold a memory cache."""
        trainer = self.trainer
        return max(int(getattr(trainer, "num_devices", 1) or 1), 1) if trainer is not None else 1

    def _on_cuda(self) -> bool:
        """Whether the model trains on a CUDA device: the attached trainer's, else whether CUDA is available."""
        trainer = self.trainer
        if trainer is not None:
            return getattr(getattr(trainer.strategy, "root_device", None), "type", "cpu") == "cuda"
        return torch.cuda.is_available()

    def loader_settings(self) -> LoaderSettings:
        """The DataLoader settings in force: the configured ones, ``auto`` resolved for this machine and device."""
        return resolve_loader_settings(**self.loader_config, cuda=self._on_cuda(), processes=self._processes())

    @property
    def cache_mode(self) -> str:
        """``none``, ``memory`` or ``disk``: the configured mode, or what ``auto`` chose for this dataset."""
        if self._cache_mode is None:
            if not self.train_ids:
                self.split()
            fingerprint = load_or_compute_fingerprint(self.info)
            index = {c.case_id: i for i, c in enumerate(self.info.training)}
            cases = [index[i] for i in (*self.train_ids, *self.val_ids)]
            estimate = cached_bytes(
                [fingerprint.shapes[i] for i in cases], [fingerprint.spacings[i] for i in cases],
                self.target_spacing, self.num_channels,
            )  # fmt: skip
            self._cache_mode = choose_cache(estimate, available_bytes(), self._processes())
        return self._cache_mode

    def _dataset(self, items: list[dict[str, Any]], transform: Compose, cached: bool, *key_extra: Any) -> Dataset:
        mode = self.cache_mode if cached else "none"
        if mode == "none":
            return Dataset(items, transform)
        if mode == "memory":
            # The transform is deterministic only, so MONAI hands out the cached dict itself (no per-item copy);
            # training samples are drawn from it by SeededSamples, which never writes into it.
            return CacheDataset(items, transform, num_workers=None, progress=False, copy_cache=False)
        # track_meta keeps MetaTensors (affine, applied_operations) in the cache, so cached cases still invert onto
        # the native grid; it needs pickle (weights_only=False), acceptable for a cache this process wrote itself.
        return PersistentDataset(
            items, transform, cache_dir=self._cache_folder(*key_extra), track_meta=True, weights_only=False
        )

    def _cache_folder(self, *extra: Any) -> Path:
        root = Path(self.cache_dir) if self.cache_dir else self.info.root / ".medseg_cache"
        return root / transform_cache_key(self._resolved_deterministic, self.target_spacing, *extra)

    @property
    def cache_path(self) -> Path | None:
        """Folder of the disk cache of the validation cases for the current deterministic config (``None`` unless
        the cache is on disk); the training cases share it unless leading sampling transforms are cached with them
        (:attr:`train_cache_path`)."""
        return self._cache_folder() if self.cache_mode == "disk" else None

    @property
    def train_cache_path(self) -> Path | None:
        """Folder of the disk cache of the training cases: keyed by the deterministic config and the non-random
        transforms that open the sampling list (e.g. the padding to the patch size), which are cached with them."""
        if self.cache_mode != "disk":
            return None
        return self._cache_folder(*self._train_head_key)

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        self.split()
        self.deterministic_transform = self.build_deterministic()
        head, random = split_random(build_transforms(self.random_config))
        self._train_head_key = list(self.random_config[: len(head)])
        train_source = self._dataset(
            _items(self._cases(self.train_ids)), Compose([*self.deterministic_transform.transforms, *head]),
            True, *self._train_head_key,
        )  # fmt: skip
        self._datasets = {
            "train": SeededSamples(train_source, Compose(random), seed=self.seed),
            "val": self._dataset(_items(self._cases(self.val_ids)), self.deterministic_transform, cached=True),
            "test": self._dataset(_items(self._cases(self.test_ids, test=True)), self.deterministic_transform, False),
        }

    def dataset_for(self, split: str) -> Any:
        """The dataset of ``train`` (:class:`~medseg.data.sampling.SeededSamples`: items are training samples),
        ``val`` or ``test`` (MONAI datasets of whole preprocessed cases), after :meth:`setup`."""
        if not self._datasets:
            self.setup()
        return self._datasets[split]

    def train_dataloader(self) -> DataLoader:
        # Order and every sample's randomness follow (seed, epoch, case), so resuming replays the same epochs and
        # workers may persist across epochs. Under DDP Lightning shards this order across ranks.
        dataset = self.dataset_for("train")
        sampler = EpochSeededSampler(dataset, seed=self.seed)
        return EpochDataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, generator=sampler.generator, drop_last=False,
            **self.loader_settings().loader_kwargs(),
        )  # fmt: skip

    def _case_loader(self, split: str) -> DataLoader:
        # Whole volumes of different shapes, one per batch as nnU-Net validates, carrying the MetaTensor trace that
        # inverts predictions: not pinned (a rare copy, and the trace must come through unchanged).
        settings = dataclasses.replace(self.loader_settings(), pin_memory=False)
        return DataLoader(self.dataset_for(split), batch_size=1, **settings.loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._case_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._case_loader("test")
