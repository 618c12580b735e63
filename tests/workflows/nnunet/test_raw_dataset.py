"""The nnU-Net raw dataset of a run: the run's cases under nnU-Net's names, accepted by nnU-Net's integrity check."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from medseg.data.formats import load_dataset_info
from medseg.data.nnunet_reader import READER_KEY, REORIENTING_READER
from medseg.data.prepare import synthetic
from medseg.errors import ConfigError
from medseg.workflows.nnunet.raw_dataset import (
    nnunet_dataset_name,
    nnunet_environment,
    write_raw_dataset,
    write_splits,
)

pytest.importorskip("nnunetv2")


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw_phantoms")
    return load_dataset_info(synthetic.build(root, seed=4, num_train=5, num_test=1, shape=(16, 16, 6)))


def test_the_raw_dataset_holds_the_runs_cases_and_passes_nnunets_check(info, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity  # lazy: optional extra

    train_ids, val_ids = ["phantom_003", "phantom_000"], ["phantom_004"]
    folder = write_raw_dataset(info, train_ids, val_ids, tmp_path / "raw")
    assert folder == tmp_path / "raw" / "Dataset990_Synthetic"
    names = sorted(p.name for p in (folder / "imagesTr").iterdir())
    assert names == ["phantom_000_0000.nii.gz", "phantom_003_0000.nii.gz", "phantom_004_0000.nii.gz"]
    source = {c.case_id: c for c in info.training}
    assert (folder / "labelsTr" / "phantom_003.nii.gz").resolve() == source["phantom_003"].label.resolve()
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["numTraining"] == 3 and dataset["labels"] == info.labels and dataset["file_ending"] == ".nii.gz"
    assert dataset["channel_names"] == {"0": "CT"}
    assert dataset[READER_KEY] == REORIENTING_READER  # the phantoms are stored in several orientations
    verify_dataset_integrity(str(folder), num_processes=1)
    (folder / "labelsTr" / "phantom_000.nii.gz").unlink()
    with pytest.raises(AssertionError, match="phantom_000"):  # the check can fail: a case without its label
        verify_dataset_integrity(str(folder), num_processes=1)


def test_the_split_file_holds_one_fold_and_the_folders_are_the_runs(tmp_path):
    path = write_splits(tmp_path / "preprocessed", "Dataset990_Synthetic", ["a", "b"], ["c"])
    assert path == tmp_path / "preprocessed" / "Dataset990_Synthetic" / "splits_final.json"
    assert json.loads(path.read_text()) == [{"train": ["a", "b"], "val": ["c"]}]
    assert nnunet_environment(tmp_path) == {
        "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
        "nnUNet_results": str(tmp_path / "results"),
    }  # fmt: skip


def test_names_and_multichannel_files(info, tmp_path):
    assert nnunet_dataset_name(replace(info, name="mni-tissue")) == "Dataset999_MniTissue"
    two_channels = replace(info, channel_names={0: "T1", 1: "T2"})  # one file per case: an MSD 4-D layout
    with pytest.raises(ConfigError, match=r"phantom_000 has 1 image file\(s\) for 2 channels .*medseg convert msd"):
        write_raw_dataset(two_channels, ["phantom_000"], [], tmp_path / "raw")
    assert not (tmp_path / "raw").exists()  # refused before anything was written
