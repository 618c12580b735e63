from __future__ import annotations

import itertools
import json

import pytest

from medseg.data.splits import SPLITS_FILE, label_fraction_subset, load_or_create_splits, make_kfold_splits
from medseg.errors import DatasetError

CASES = [f"case_{i:03d}" for i in range(23)]


def test_kfold_validation_folds_partition_the_cases():
    splits = make_kfold_splits(CASES, num_folds=5, seed=1)
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == sorted(CASES)  # every case validated exactly once
    for split in splits:
        assert set(split["train"]).isdisjoint(split["val"])
        assert sorted(split["train"] + split["val"]) == sorted(CASES)
    assert {len(s["val"]) for s in splits} <= {4, 5}


def test_kfold_is_seeded():
    assert make_kfold_splits(CASES, 5, seed=3) == make_kfold_splits(list(reversed(CASES)), 5, seed=3)
    assert make_kfold_splits(CASES, 5, seed=3) != make_kfold_splits(CASES, 5, seed=4)


def test_splits_file_is_created_once_and_then_reused(tmp_path):
    first = load_or_create_splits(tmp_path, CASES, num_folds=5, seed=0)
    assert json.loads((tmp_path / SPLITS_FILE).read_text()) == first
    # A different seed does not reshuffle an existing split file: every run sees the same folds.
    assert load_or_create_splits(tmp_path, CASES, num_folds=5, seed=99) == first


def test_user_splits_file_naming_unknown_cases_is_refused(tmp_path):
    (tmp_path / SPLITS_FILE).write_text(json.dumps([{"train": ["case_000", "ghost"], "val": ["case_001"]}]))
    with pytest.raises(DatasetError, match="ghost"):
        load_or_create_splits(tmp_path, CASES)


def test_malformed_splits_file_names_the_file(tmp_path):
    (tmp_path / SPLITS_FILE).write_text("{not json")
    with pytest.raises(DatasetError, match=SPLITS_FILE):
        load_or_create_splits(tmp_path, CASES)


def test_label_fractions_are_nested_and_reproducible():
    fractions = [0.01, 0.1, 0.25, 0.5, 1.0]
    for seed in range(5):
        subsets = [set(label_fraction_subset(CASES, f, seed)) for f in fractions]
        for small, large in itertools.pairwise(subsets):
            assert small <= large
        assert subsets[-1] == set(CASES)
        assert [len(s) for s in subsets] == [1, 3, 6, 12, 23]
        assert label_fraction_subset(CASES, 0.25, seed) == label_fraction_subset(list(reversed(CASES)), 0.25, seed)
    assert label_fraction_subset(CASES, 0.25, 0) != label_fraction_subset(CASES, 0.25, 1)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_fraction_out_of_range(fraction):
    with pytest.raises(DatasetError, match="label_fraction"):
        label_fraction_subset(CASES, fraction)
