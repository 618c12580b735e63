"""Cross-validation folds and label-budget subsets that every arm of a comparison shares.

Folds are stored in the dataset folder as ``splits_final.json`` in nnU-Net's format (a list of
``{"train": [...], "val": [...]}``), so an nnU-Net user can reuse their own file and every run sees the same split.
Label fractions are *nested*: with one seed, the 1% subset lies inside the 10% subset, which lies inside 100%, so a
curve over label budgets measures the budget and not a reshuffle of cases.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.atomic import atomic_write_json
from medseg.errors import DatasetError

__all__ = ["SPLITS_FILE", "label_fraction_subset", "load_or_create_splits", "make_kfold_splits"]

SPLITS_FILE = "splits_final.json"


def make_kfold_splits(case_ids: Sequence[str], num_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """Shuffle the cases with ``seed`` and deal them into ``num_folds`` validation folds of near-equal size."""
    ids = sorted(case_ids)
    if num_folds < 2:
        raise DatasetError(f"num_folds must be at least 2, got {num_folds}.")
    if len(ids) < num_folds:
        raise DatasetError(f"{len(ids)} training cases cannot make {num_folds} folds; lower data.num_folds.")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.array_split(order, num_folds)
    splits = []
    for fold in folds:
        val = sorted(ids[i] for i in fold)
        splits.append({"train": [c for c in ids if c not in set(val)], "val": val})
    return splits


def load_or_create_splits(
    dataset_root: str | os.PathLike[str], case_ids: Sequence[str], num_folds: int = 5, seed: int = 12345
) -> list[dict[str, list[str]]]:
    """Read ``splits_final.json`` from the dataset folder, or create it (atomically) on first use.

    Raises:
        DatasetError: the file exists but is malformed or names cases that are not in the dataset.
    """
    path = Path(dataset_root) / SPLITS_FILE
    if path.is_file():
        try:
            splits = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path} is not valid JSON ({err}); fix it or delete it to regenerate folds.") from err
        if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
            raise DatasetError(f"{path} must be a list of {{'train': [...], 'val': [...]}}; delete it to regenerate.")
        unknown = sorted({c for s in splits for c in s["train"] + s["val"]} - set(case_ids))
        if unknown:
            raise DatasetError(
                f"{path} names cases that are not in the dataset: {', '.join(unknown[:5])}. "
                f"Delete the file to regenerate the folds, or fix the case names."
            )
        return splits
    splits = make_kfold_splits(case_ids, num_folds, seed)
    atomic_write_json(path, splits)
    return splits


def label_fraction_subset(train_ids: Sequence[str], fraction: float, seed: int = 0) -> list[str]:
    """The first ``ceil(fraction * n)`` cases of one seeded permutation (at least one case).

    Because every fraction takes a prefix of the same permutation, subsets are nested across fractions.
    """
    if not 0 < fraction <= 1:
        raise DatasetError(f"label_fraction must be in (0, 1], got {fraction}.")
    ids = sorted(train_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    keep = max(1, math.ceil(fraction * len(ids) - 1e-9))
    return sorted(ids[i] for i in order[:keep])
