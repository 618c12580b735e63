"""Cross-validation folds and label-budget subsets that every arm of a comparison shares, the same as nnU-Net's.

Folds live in ``splits_final.json`` in nnU-Net's format (a list of ``{"train": [...], "val": [...]}``). nnU-Net reads
that file from ``$nnUNet_preprocessed/<DatasetXXX_Name>/`` and, without one, makes 5 folds itself
(``nnUNetTrainer.do_split``: scikit-learn's ``KFold(shuffle=True, random_state=12345)`` over the sorted case ids).
medseg keeps its file in the dataset folder and finds folds in this order (:func:`load_or_create_splits`):

1. the dataset folder's ``splits_final.json``, read as is (the published demos depend on theirs); when
   ``$nnUNet_preprocessed`` holds a splits file for the same dataset, the two must hold the same folds, or medseg
   refuses rather than train on other folds than nnU-Net does;
2. else the nnU-Net user's ``$nnUNet_preprocessed/<DatasetXXX_Name>/splits_final.json``, read as is;
3. else new folds made with nnU-Net's own algorithm (:func:`nnunet_kfold_splits`) and written to the dataset folder,
   so a fresh dataset gets nnU-Net's folds for the same number of folds and seed (5 and 12345 in nnU-Net).

:func:`write_nnunet_splits` puts medseg's file where nnU-Net reads it. :func:`make_kfold_splits` is medseg's earlier
permutation, kept for what was published with it: the demo datasets' files (written by ``medseg prepare``) and the
classification tables' folds.

Label fractions are *nested*: with one seed, the 1% subset lies inside the 10% subset, which lies inside 100%, so a
curve over label budgets measures the budget and not a reshuffle of cases.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.atomic import atomic_write_json
from medseg.errors import DatasetError

__all__ = [
    "NNUNET_PREPROCESSED",
    "SPLITS_FILE",
    "label_fraction_subset",
    "load_or_create_splits",
    "make_kfold_splits",
    "nnunet_kfold_splits",
    "nnunet_splits_path",
    "write_nnunet_splits",
]

SPLITS_FILE = "splits_final.json"
NNUNET_PREPROCESSED = "nnUNet_preprocessed"

log = logging.getLogger("medseg.data")


def _check_folds(case_ids: Sequence[str], num_folds: int) -> list[str]:
    ids = sorted(case_ids)
    if num_folds < 2:
        raise DatasetError(f"num_folds must be at least 2, got {num_folds}.")
    if len(ids) < num_folds:
        raise DatasetError(f"{len(ids)} training cases cannot make {num_folds} folds; lower data.num_folds.")
    return ids


def nnunet_kfold_splits(case_ids: Sequence[str], num_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """nnU-Net's folds: ``KFold(num_folds, shuffle=True, random_state=seed)`` over the sorted case ids, as
    ``nnunetv2.utilities.crossval_split.generate_crossval_split`` makes them (both lists in sorted order)."""
    from sklearn.model_selection import KFold  # lazy: ~1 s of imports (scipy), needed only when folds are made

    ids = _check_folds(case_ids, num_folds)
    folds = KFold(n_splits=num_folds, shuffle=True, random_state=seed).split(ids)
    return [{"train": [ids[i] for i in train], "val": [ids[i] for i in val]} for train, val in folds]


def make_kfold_splits(case_ids: Sequence[str], num_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """medseg's earlier folds: the sorted cases permuted with ``numpy.random.default_rng(seed)`` and dealt into
    ``num_folds`` near-equal validation folds. Not nnU-Net's (:func:`nnunet_kfold_splits`); kept because the demo
    datasets' published folds and the classification folds were made with it."""
    ids = _check_folds(case_ids, num_folds)
    order = np.random.default_rng(seed).permutation(len(ids))
    splits = []
    for fold in np.array_split(order, num_folds):
        val = sorted(ids[i] for i in fold)
        splits.append({"train": [c for c in ids if c not in set(val)], "val": val})
    return splits


def nnunet_splits_path(dataset_root: str | os.PathLike[str]) -> Path | None:
    """``$nnUNet_preprocessed/<dataset folder name>/splits_final.json``, where nnU-Net reads the folds of this dataset
    (``None`` when ``nnUNet_preprocessed`` is not set)."""
    preprocessed = os.environ.get(NNUNET_PREPROCESSED)
    if not preprocessed:
        return None
    return Path(preprocessed).expanduser() / Path(dataset_root).resolve().name / SPLITS_FILE


def _read_splits(path: Path, case_ids: Sequence[str]) -> list[dict[str, list[str]]]:
    """A splits file, checked: a list of ``{"train", "val"}`` naming only the dataset's cases."""
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


def _same_folds(first: list[dict], second: list[dict]) -> bool:
    """The same folds in the same order, whatever the order of the cases inside each list."""

    def sets(splits: list[dict]) -> list[tuple[frozenset, frozenset]]:
        return [(frozenset(s["train"]), frozenset(s["val"])) for s in splits]

    return sets(first) == sets(second)


def load_or_create_splits(
    dataset_root: str | os.PathLike[str], case_ids: Sequence[str], num_folds: int = 5, seed: int = 12345
) -> list[dict[str, list[str]]]:
    """The dataset's folds: its own file, else the nnU-Net user's, else nnU-Net's algorithm (module docstring).

    New folds are written (atomically) to the dataset folder. ``num_folds`` and ``seed`` are used only then.

    Raises:
        DatasetError: a file that is malformed or names cases not in the dataset, or a dataset file and an nnU-Net
            file that hold different folds.
    """
    own = Path(dataset_root) / SPLITS_FILE
    theirs = nnunet_splits_path(dataset_root)
    theirs = theirs if theirs is not None and theirs.is_file() else None
    if own.is_file():
        splits = _read_splits(own, case_ids)
        if theirs is not None and not _same_folds(splits, _read_splits(theirs, case_ids)):
            raise DatasetError(
                f"{own} and nnU-Net's {theirs} hold different folds, so medseg and nnU-Net would train on different "
                f"cases. Keep one: delete the other, or copy it over the other (medseg.data.splits."
                f"write_nnunet_splits copies the dataset's file to nnU-Net's folder)."
            )
        log.info("folds: %s (%d folds)%s", own, len(splits), " = nnU-Net's " + str(theirs) if theirs else "")
        return splits
    if theirs is not None:
        splits = _read_splits(theirs, case_ids)
        log.info("folds: nnU-Net's %s (%d folds; $%s)", theirs, len(splits), NNUNET_PREPROCESSED)
        return splits
    splits = nnunet_kfold_splits(case_ids, num_folds, seed)
    atomic_write_json(own, splits)
    log.info("folds: new, nnU-Net's KFold (%d folds, seed %d), written to %s", num_folds, seed, own)
    return splits


def write_nnunet_splits(
    dataset_root: str | os.PathLike[str], preprocessed: str | os.PathLike[str] | None = None
) -> Path:
    """Copy the dataset's ``splits_final.json`` to ``<preprocessed>/<dataset folder name>/`` (default
    ``$nnUNet_preprocessed``), where ``nnUNetv2_train`` reads its folds, so both tools train on the same cases.

    Raises:
        DatasetError: the dataset has no splits file yet (train once, or call :func:`load_or_create_splits`), no
            preprocessed folder is given or set, or nnU-Net's folder already holds different folds.
    """
    root = Path(dataset_root)
    own = root / SPLITS_FILE
    if not own.is_file():
        raise DatasetError(f"{own} does not exist yet: train once on the dataset (or run load_or_create_splits) first.")
    if preprocessed is None and not os.environ.get(NNUNET_PREPROCESSED):
        raise DatasetError(f"set ${NNUNET_PREPROCESSED} (nnU-Net's preprocessed folder) or pass the folder.")
    base = Path(preprocessed) if preprocessed is not None else Path(os.environ[NNUNET_PREPROCESSED]).expanduser()
    target = base / root.resolve().name / SPLITS_FILE
    splits = json.loads(own.read_text())
    if target.is_file() and not _same_folds(splits, json.loads(target.read_text())):
        raise DatasetError(f"{target} already holds other folds than {own}; delete it first to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(target, splits, indent=4)


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
