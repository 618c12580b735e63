"""The LightningDataModule that turns an nnU-Net/MSD dataset folder into train, validation and test batches.

It owns the decisions that make comparisons fair and runs reproducible: which cases are in which fold
(``splits_final.json``), which training cases a label budget keeps (nested, seeded), what is cached (only the
deterministic transforms, under a key that changes with their config), and that validation and test cases are
whole volumes whose transforms can be inverted onto the native grid.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose

from medseg.data.fingerprint import load_or_compute_fingerprint
from medseg.data.formats import CaseFiles, DatasetInfo, load_dataset_info
from medseg.data.io import LoadCased
from medseg.data.sampling import EpochSeededSampler
from medseg.data.splits import label_fraction_subset, load_or_create_splits
from medseg.data.transforms import build_transforms, transform_cache_key
from medseg.errors import ConfigError
from medseg.paths import find_dataset

__all__ = ["SegmentationDataModule", "resolve_median_spacing"]

_CACHE_MODES = ("none", "memory", "disk")


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
        cache: ``none``, ``memory`` (CacheDataset) or ``disk`` (PersistentDataset under ``cache_dir/<key>``).
        cache_dir: folder for the disk cache (default ``<dataset>/.medseg_cache``).
        data_root: folder of datasets, overriding ``$MEDSEG_DATA``.
        seed: seed of the training order and augmentation, per epoch (see :class:`EpochSeededSampler`).
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
        num_workers: int = 0,
        cache: str = "memory",
        cache_dir: str | None = None,
        data_root: str | None = None,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if cache not in _CACHE_MODES:
            raise ConfigError(f"data.cache must be one of {_CACHE_MODES}, got {cache!r}.")
        self.dataset, self.fold, self.num_folds, self.split_seed = dataset, fold, num_folds, split_seed
        self.label_fraction, self.fraction_seed = label_fraction, fraction_seed
        self.deterministic_config = _transform_list(preprocess)
        self.random_config = _transform_list(sampling) + _transform_list(augment)
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.cache, self.cache_dir, self.seed = cache, cache_dir, seed
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

    def _split(self) -> None:
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

    def _dataset(self, items: list[dict[str, Any]], transform: Compose, cached: bool) -> Dataset:
        if not cached or self.cache == "none":
            return Dataset(items, transform)
        if self.cache == "memory":
            return CacheDataset(items, transform, num_workers=self.num_workers or None, progress=False)
        # track_meta keeps MetaTensors (affine, applied_operations) in the cache, so cached cases still invert onto
        # the native grid; it needs pickle (weights_only=False), acceptable for a cache this process wrote itself.
        return PersistentDataset(items, transform, cache_dir=self.cache_path, track_meta=True, weights_only=False)

    @property
    def cache_path(self) -> Path | None:
        """Folder of the disk cache for the current deterministic config (``None`` unless ``cache="disk"``)."""
        if self.cache != "disk":
            return None
        root = Path(self.cache_dir) if self.cache_dir else self.info.root / ".medseg_cache"
        return root / transform_cache_key(self._resolved_deterministic, self.target_spacing)

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        self._split()
        self.deterministic_transform = self.build_deterministic()
        random = build_transforms(self.random_config)
        train_transform = Compose([*self.deterministic_transform.transforms, *random])
        self._datasets = {
            "train": self._dataset(_items(self._cases(self.train_ids)), train_transform, cached=True),
            "val": self._dataset(_items(self._cases(self.val_ids)), self.deterministic_transform, cached=True),
            "test": self._dataset(_items(self._cases(self.test_ids, test=True)), self.deterministic_transform, False),
        }

    def dataset_for(self, split: str) -> Dataset:
        """The MONAI dataset of ``train``, ``val`` or ``test`` (after :meth:`setup`)."""
        if not self._datasets:
            self.setup()
        return self._datasets[split]

    def train_dataloader(self) -> DataLoader:
        # Order, worker seeds and augmentation follow (seed, epoch), so resuming replays the same epochs. Workers are
        # not persistent: they must be re-seeded each epoch. Under DDP Lightning shards this order across ranks.
        sampler = EpochSeededSampler(self.dataset_for("train"), seed=self.seed)
        return DataLoader(
            self.dataset_for("train"), batch_size=self.batch_size, sampler=sampler, generator=sampler.generator,
            num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=False,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        # Whole volumes of different shapes: one per batch, as nnU-Net validates.
        return DataLoader(self.dataset_for("val"), batch_size=1, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset_for("test"), batch_size=1, num_workers=self.num_workers)
