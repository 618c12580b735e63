"""Folds as nnU-Net makes and reads them, the earlier permutation kept for published folds, nested label budgets."""

from __future__ import annotations

import itertools
import json

import pytest

from medseg.data.splits import (
    NNUNET_PREPROCESSED,
    SPLITS_FILE,
    label_fraction_subset,
    load_or_create_splits,
    make_kfold_splits,
    nnunet_kfold_splits,
    write_nnunet_splits,
)
from medseg.errors import DatasetError

CASES = [f"case_{i:03d}" for i in range(23)]


@pytest.fixture(autouse=True)
def no_nnunet_folder(monkeypatch):
    """Tests see only the nnU-Net folder they set: one set in the shell must not leak in."""
    monkeypatch.delenv(NNUNET_PREPROCESSED, raising=False)


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


@pytest.mark.parametrize(("count", "num_folds", "seed"), [(23, 5, 12345), (12, 4, 12345), (7, 3, 0), (5, 5, 12345)])
def test_new_folds_are_the_folds_nnunet_makes_itself(count, num_folds, seed):
    """nnU-Net's ``do_split``: ``generate_crossval_split`` over the sorted identifiers (5 folds, seed 12345)."""
    generate_crossval_split = pytest.importorskip("nnunetv2.utilities.crossval_split").generate_crossval_split
    cases = [f"case_{i:03d}" for i in range(count)]
    expected = generate_crossval_split(sorted(cases), seed=seed, n_splits=num_folds)
    expected = [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]} for s in expected]
    assert nnunet_kfold_splits(list(reversed(cases)), num_folds, seed) == expected
    assert make_kfold_splits(cases, num_folds, seed) != expected  # the earlier permutation is not nnU-Net's


def test_a_fresh_dataset_gets_nnunets_folds(tmp_path):
    splits = load_or_create_splits(tmp_path, CASES)
    assert splits == nnunet_kfold_splits(CASES) and json.loads((tmp_path / SPLITS_FILE).read_text()) == splits


def _nnunet_file(preprocessed, dataset, splits):
    folder = preprocessed / dataset.name
    folder.mkdir(parents=True)
    (folder / SPLITS_FILE).write_text(json.dumps(splits))
    return folder / SPLITS_FILE


def test_the_nnunet_users_splits_file_is_picked_up(tmp_path, monkeypatch, caplog):
    dataset, preprocessed = tmp_path / "Dataset123_Liver", tmp_path / "preprocessed"
    dataset.mkdir()
    mine = [{"train": CASES[:20], "val": CASES[20:]}, {"train": CASES[3:], "val": CASES[:3]}]
    path = _nnunet_file(preprocessed, dataset, mine)
    monkeypatch.setenv(NNUNET_PREPROCESSED, str(preprocessed))
    with caplog.at_level("INFO", logger="medseg.data"):
        assert load_or_create_splits(dataset, CASES, num_folds=5) == mine
    assert str(path) in caplog.text and "nnU-Net" in caplog.text
    assert not (dataset / SPLITS_FILE).exists()  # the nnU-Net user's file stays the one source


def test_a_dataset_file_and_a_different_nnunet_file_are_refused(tmp_path, monkeypatch):
    dataset, preprocessed = tmp_path / "Dataset123_Liver", tmp_path / "preprocessed"
    dataset.mkdir()
    own = load_or_create_splits(dataset, CASES, num_folds=4)
    monkeypatch.setenv(NNUNET_PREPROCESSED, str(preprocessed))
    _nnunet_file(preprocessed, dataset, nnunet_kfold_splits(CASES, 5))
    with pytest.raises(DatasetError, match="different folds") as caught:
        load_or_create_splits(dataset, CASES)
    assert "\n" not in str(caught.value) and "write_nnunet_splits" in str(caught.value)
    (preprocessed / dataset.name / SPLITS_FILE).unlink()
    written = write_nnunet_splits(dataset)  # medseg's file where nnU-Net reads it: both tools agree from now on
    assert written == preprocessed / dataset.name / SPLITS_FILE and json.loads(written.read_text()) == own
    reordered = [{"train": sorted(s["train"], reverse=True), "val": s["val"]} for s in own]
    written.write_text(json.dumps(reordered))  # the same folds, listed in another order
    assert load_or_create_splits(dataset, CASES) == own


def test_writing_for_nnunet_needs_a_folder_and_keeps_other_folds(tmp_path, monkeypatch):
    dataset = tmp_path / "Dataset123_Liver"
    dataset.mkdir()
    with pytest.raises(DatasetError, match="train once"):
        write_nnunet_splits(dataset, tmp_path / "pre")
    load_or_create_splits(dataset, CASES)
    with pytest.raises(DatasetError, match=NNUNET_PREPROCESSED):
        write_nnunet_splits(dataset)
    _nnunet_file(tmp_path / "pre", dataset, [{"train": CASES[1:], "val": CASES[:1]}])
    with pytest.raises(DatasetError, match="other folds"):
        write_nnunet_splits(dataset, tmp_path / "pre")
