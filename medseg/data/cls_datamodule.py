"""The LightningDataModule of classification tables: splits, label budgets, cached preprocessing, 2-D and 3-D.

Per case the pipeline is: read the files (:class:`~medseg.data.cls_transforms.LoadClassificationd`), the
deterministic preset from ``conf/data/preprocess`` (the same CT/MRI presets as segmentation), drop the singleton
axis of 2-D slices, pad in-plane to a square and resize to ``size`` x ``size`` pixels (3-D: x ``num_slices`` slices
along the last axis), then, for training only, the random augmentations. The deterministic part is cached in memory.

Splits: rows whose ``split`` is ``test`` are the test cases, ``val`` the validation cases; when no row is ``val``,
the remaining rows are dealt into ``num_folds`` seeded folds and ``fold`` is held out. The label budget keeps a
nested, seeded subset of the training cases (:func:`medseg.data.splits.label_fraction_subset`), as in segmentation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose, EnsureTyped, Resized

from medseg.data.classification import ClassificationCase, read_classification_table, targets_array
from medseg.data.cls_transforms import LoadClassificationd, SquarePadd, ToSpatialDimsd
from medseg.data.sampling import EpochSeededSampler
from medseg.data.splits import label_fraction_subset, make_kfold_splits
from medseg.data.transforms import build_transforms, transform_cache_key
from medseg.errors import ConfigError, DatasetError
from medseg.paths import find_dataset

__all__ = ["TABLE_NAMES", "ClassificationDataModule", "classification_transform", "resolve_table"]

#: File names looked up in a dataset folder when ``table`` names a dataset rather than a file.
TABLE_NAMES = ("classification.csv", "classification.json")


def resolve_table(table: str, data_root: str | None = None) -> Path:
    """``table`` as a CSV/JSON file path, or the ``classification.csv`` of a dataset found by name (``mni-slices``)."""
    path = Path(table)
    if path.is_file():
        return path.resolve()
    folder = find_dataset(table, Path(data_root) if data_root else None)
    for name in TABLE_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"{folder} has no {' or '.join(TABLE_NAMES)}; give data.table as the path of the table.")


def _transform_list(node: Any) -> list[Any]:
    if node is None:
        return []
    if isinstance(node, Mapping):
        return list(node.get("transforms") or [])
    return list(node)


def classification_transform(
    preprocess: Sequence[Any] | Mapping[str, Any],
    spatial_dims: int = 2,
    size: int = 256,
    num_slices: int = 16,
    load: bool = True,
) -> Compose:
    """The deterministic per-case pipeline (files -> model input), shared by training, evaluation and prediction.

    Args:
        preprocess: transform configs of the preset (``conf/data/preprocess``) or its group node.
        spatial_dims: 2 gives ``(C, size, size)``, 3 gives ``(C, size, size, num_slices)``.
        size: in-plane side in pixels after padding to a square.
        num_slices: slices of 3-D volumes along their last axis.
        load: start by reading the files (``False``: ``image`` is already a channel-first image).
    """
    shape = (size, size) if spatial_dims == 2 else (size, size, num_slices)
    return Compose(
        [
            *([LoadClassificationd(keys="image")] if load else []),
            *build_transforms(_transform_list(preprocess)),
            ToSpatialDimsd(keys="image", spatial_dims=spatial_dims),
            SquarePadd(keys="image"),
            Resized(keys="image", spatial_size=shape, mode="area" if spatial_dims == 2 else "trilinear"),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        ]
    )


class ClassificationDataModule(L.LightningDataModule):
    """Classification table -> batches ``{"image", "target", "case_id", "index"}``.

    Args:
        dataset: a dataset name whose folder holds ``classification.csv`` (``mni-slices``), or a CSV/JSON path.
        image_columns, label_columns, label_kind, classes, subgroup_columns, id_column, split_column: see
            :func:`medseg.data.classification.read_classification_table`.
        spatial_dims: 2 (images ``(C, size, size)``) or 3 (volumes ``(C, size, size, num_slices)``).
        size: in-plane side in pixels after padding to a square and resizing (LiteMedSAM: 256).
        num_slices: slices along the last axis of 3-D volumes after resizing.
        fold, num_folds, split_seed: cross-validation when the table has no ``val`` rows.
        label_fraction, fraction_seed: nested label budget of the training cases.
        preprocess: deterministic transform configs (``conf/data/preprocess``), cached.
        augment: random transform configs for training batches (key ``image``).
        batch_size, num_workers: training loader; evaluation loaders use ``eval_batch_size``.
        cache: ``memory`` (MONAI ``CacheDataset`` of the deterministic part) or ``none``.
        data_root: folder of datasets, overriding ``$MEDSEG_DATA``.
        in_channels: image channels; default one per image column.
        seed: seed of the training order and augmentation, per epoch.
    """

    def __init__(
        self,
        dataset: str,
        image_columns: Sequence[str] = ("image",),
        label_columns: Sequence[str] = ("label",),
        label_kind: str = "multiclass",
        classes: Sequence[str] | None = None,
        subgroup_columns: Sequence[str] = (),
        id_column: str = "case_id",
        split_column: str = "split",
        spatial_dims: int = 2,
        size: int = 256,
        num_slices: int = 16,
        fold: int = 0,
        num_folds: int = 5,
        split_seed: int = 12345,
        label_fraction: float = 1.0,
        fraction_seed: int = 0,
        preprocess: Sequence[Any] | Mapping[str, Any] = (),
        augment: Sequence[Any] | Mapping[str, Any] = (),
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        cache: str = "memory",
        data_root: str | None = None,
        in_channels: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"data.spatial_dims must be 2 or 3, got {spatial_dims}.")
        if cache not in ("memory", "none"):
            raise ConfigError(f"data.cache must be 'memory' or 'none' for classification, got {cache!r}.")
        self.table_path = resolve_table(str(dataset), data_root)
        self.cases, self.spec = read_classification_table(
            self.table_path, list(image_columns), list(label_columns), label_kind, classes, list(subgroup_columns),
            id_column, split_column,
        )  # fmt: skip
        self.subgroup_columns = list(subgroup_columns)
        self.spatial_dims, self.size, self.num_slices = spatial_dims, int(size), int(num_slices)
        self.fold, self.num_folds, self.split_seed = fold, num_folds, split_seed
        self.label_fraction, self.fraction_seed = label_fraction, fraction_seed
        self.deterministic_config = _transform_list(preprocess)
        self.random_config = _transform_list(augment)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.cache, self.seed = cache, seed
        self.in_channels = int(in_channels) if in_channels is not None else len(image_columns)
        self.by_id = {c.case_id: c for c in self.cases}
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []
        self.test_ids: list[str] = []
        self._datasets: dict[str, Dataset] = {}
        self._split()

    # What models need to know before setup().
    @property
    def num_outputs(self) -> int:
        return self.spec.num_outputs

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.names)

    def _split(self) -> None:
        test = [c.case_id for c in self.cases if c.split == "test"]
        val = [c.case_id for c in self.cases if c.split == "val"]
        pool = [c.case_id for c in self.cases if c.split not in ("test", "val")]
        if not val:
            folds = make_kfold_splits(pool, self.num_folds, self.split_seed)
            if not 0 <= self.fold < len(folds):
                raise ConfigError(f"data.fold={self.fold} but there are {len(folds)} folds.")
            pool, val = folds[self.fold]["train"], folds[self.fold]["val"]
        if not pool:
            raise DatasetError(f"{self.table_path} has no training cases (rows with split 'train' or empty).")
        self.train_ids = label_fraction_subset(pool, self.label_fraction, self.fraction_seed)
        self.val_ids, self.test_ids = sorted(val), sorted(test)

    def preprocessing_signature(self) -> str:
        """Hash of everything between the files and the model input (feature-cache keys use it)."""
        return transform_cache_key(self.deterministic_config, self.spatial_dims, self.size, self.num_slices)

    def build_deterministic(self) -> Compose:
        """Load + preset + 2-D/3-D shape + square pad + resize: the transform of evaluation and prediction."""
        return classification_transform(self.deterministic_config, self.spatial_dims, self.size, self.num_slices)

    def items(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Dataset items of ``ids``: image paths, target, id and row index."""
        rows = []
        for case_id in ids:
            case: ClassificationCase = self.by_id[case_id]
            target = np.asarray(case.target, dtype=np.float32 if self.spec.kind == "multilabel" else np.int64)
            rows.append({"image": [str(p) for p in case.images], "target": target, "case_id": case_id})
        return rows

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        deterministic = self.build_deterministic()
        self.deterministic_transform = deterministic
        cached = {}
        for split, ids in (("train", self.train_ids), ("val", self.val_ids), ("test", self.test_ids)):
            if self.cache == "memory" and ids:
                cached[split] = CacheDataset(self.items(ids), deterministic, progress=False, num_workers=None)
            else:
                cached[split] = Dataset(self.items(ids), deterministic)
        self._datasets = {f"{k}_eval": v for k, v in cached.items()}
        random = Compose(build_transforms(self.random_config))
        self._datasets["train"] = Dataset(cached["train"], transform=random) if self.random_config else cached["train"]

    def dataset_for(self, split: str, augment: bool = False) -> Dataset:
        """``train``/``val``/``test`` cases, preprocessed; ``augment`` adds the random transforms (training only)."""
        self.setup()
        return self._datasets["train" if split == "train" and augment else f"{split}_eval"]

    def subgroups(self, ids: Sequence[str]) -> dict[str, list[str | None]]:
        """``{column: value per case}`` for ``ids``, in order (empty when the table has no subgroup columns)."""
        return {c: [self.by_id[i].subgroups.get(c) for i in ids] for c in self.subgroup_columns}

    def targets(self, ids: Sequence[str]) -> np.ndarray:
        """Targets of ``ids`` as ``(N,)`` class indices or ``(N, K)`` 0/1."""
        return targets_array([self.by_id[i] for i in ids])

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset_for("train", augment=True)
        sampler = EpochSeededSampler(dataset, seed=self.seed)
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, generator=sampler.generator,
            num_workers=self.num_workers, drop_last=len(dataset) > self.batch_size,
        )  # fmt: skip

    def eval_dataloader(self, split: str) -> DataLoader:
        """Preprocessed cases of ``split`` in table order, unaugmented (features, validation, test)."""
        return DataLoader(self.dataset_for(split), batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
