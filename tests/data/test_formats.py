"""dataset.json parsing and case discovery for the nnU-Net v2 and MSD layouts."""

from __future__ import annotations

import json

import pytest

from medseg.data.formats import CaseFiles, load_dataset_info, write_dataset_json
from medseg.errors import DatasetError, MedsegError


def _edit_json(root, **changes):
    path = root / "dataset.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


def test_nnunet_single_channel(make_nnunet_dataset):
    root = make_nnunet_dataset(num_training=3)
    info = load_dataset_info(root)
    assert info.layout == "nnunetv2"
    assert info.name == "Dataset990_Synthetic"
    assert info.root == root.resolve()
    assert info.channel_names == {0: "CT"}
    assert info.num_channels == 1
    assert info.labels == {"background": 0, "organ": 1, "tumour": 2}
    assert info.num_classes == 3
    assert info.foreground_labels == {"organ": 1, "tumour": 2}
    assert info.file_ending == ".nii.gz"
    assert [c.case_id for c in info.training] == ["case_000", "case_001", "case_002"]
    first = info.training[0]
    assert first.images == (root.resolve() / "imagesTr" / "case_000_0000.nii.gz",)
    assert first.label == root.resolve() / "labelsTr" / "case_000.nii.gz"
    assert info.test == ()
    assert info.raw["numTraining"] == 3


def test_nnunet_two_channels_in_channel_order(make_nnunet_dataset):
    root = make_nnunet_dataset(channels=("T2", "ADC"), num_training=2)
    info = load_dataset_info(root)
    assert info.channel_names == {0: "T2", 1: "ADC"}
    for case in info.training:
        assert [p.name for p in case.images] == [f"{case.case_id}_0000.nii.gz", f"{case.case_id}_0001.nii.gz"]


def test_case_discovery_sorts_and_groups(make_nnunet_dataset, nifti_writer):
    import numpy as np

    root = make_nnunet_dataset(num_training=0, channels=("T1", "T2"))
    for name in ["b_10_0001", "b_10_0000", "a_2_0000", "a_2_0001", "a_10_0000", "a_10_0001"]:
        nifti_writer(root / "imagesTr" / f"{name}.nii.gz", np.zeros((2, 2, 2), np.float32))
    info = load_dataset_info(root)
    assert [c.case_id for c in info.training] == ["a_10", "a_2", "b_10"]
    assert [p.name for p in info.training[2].images] == ["b_10_0000.nii.gz", "b_10_0001.nii.gz"]
    assert all(c.label is None for c in info.training)


def test_missing_files_are_recorded_not_raised(make_nnunet_dataset):
    root = make_nnunet_dataset(channels=("T1", "T2"), num_training=2)
    (root / "labelsTr" / "case_000.nii.gz").unlink()
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    info = load_dataset_info(root)
    assert info.training[0].label is None
    assert [p.name for p in info.training[1].images] == ["case_001_0000.nii.gz"]


def test_images_ts_without_and_with_labels_ts(make_nnunet_dataset, tmp_path):
    without = load_dataset_info(make_nnunet_dataset(name="Dataset991_A", num_test=2))
    assert [c.case_id for c in without.test] == ["test_000", "test_001"]
    assert all(c.label is None for c in without.test)
    with_labels = load_dataset_info(make_nnunet_dataset(name="Dataset992_B", num_test=2, test_labels=True))
    assert [c.label.name for c in with_labels.test] == ["test_000.nii.gz", "test_001.nii.gz"]
    assert all(c.label.parent.name == "labelsTs" for c in with_labels.test)


def test_msd_layout_with_4d_images_and_inverted_labels(make_msd_dataset):
    root = make_msd_dataset(modalities=("T2", "ADC"), num_training=2, num_test=1)
    info = load_dataset_info(root)
    assert info.layout == "msd"
    assert info.channel_names == {0: "T2", 1: "ADC"}
    assert info.labels == {"background": 0, "PZ": 1, "TZ": 2}
    assert info.file_ending == ".nii.gz"
    assert [c.case_id for c in info.training] == ["prostate_00", "prostate_01"]
    case = info.training[0]
    assert case.images == (root.resolve() / "imagesTr" / "prostate_00.nii.gz",)
    assert case.label == root.resolve() / "labelsTr" / "prostate_00.nii.gz"
    assert info.test == (CaseFiles("prostate_02", (root.resolve() / "imagesTs" / "prostate_02.nii.gz",), None),)


def test_msd_test_labels_from_labels_ts(make_msd_dataset, nifti_writer):
    import numpy as np

    root = make_msd_dataset(modalities=("CT",), num_test=1)
    nifti_writer(root / "labelsTs" / "prostate_02.nii.gz", np.zeros((10, 9, 6), np.uint8))
    info = load_dataset_info(root)
    assert info.test[0].label == root.resolve() / "labelsTs" / "prostate_02.nii.gz"


def test_name_resolved_through_data_root(make_nnunet_dataset, monkeypatch):
    root = make_nnunet_dataset(name="Dataset993_Liver")
    monkeypatch.setenv("MEDSEG_DATA", str(root.parent))
    assert load_dataset_info("993").root == root.resolve()
    assert load_dataset_info("liver").name == "Dataset993_Liver"
    assert load_dataset_info(root / "dataset.json").root == root.resolve()


@pytest.mark.parametrize("field", ["channel_names", "labels", "numTraining", "file_ending"])
def test_missing_required_field_names_file_and_field(make_nnunet_dataset, field):
    root = make_nnunet_dataset()
    path = _edit_json(root, **{field: None})
    with pytest.raises(DatasetError) as err:
        load_dataset_info(root)
    assert str(path) in str(err.value)
    assert f"'{field}'" in str(err.value)
    assert "missing" in str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("labels", {"background": 0, "organ": "one"}, "values must be integers"),
        ("labels", {"background": 0, "organ": -1}, ">= 0"),
        ("labels", {"organ": 1}, "value 0"),
        ("labels", {"background": 0, "a": 1, "b": 1}, "share a value"),
        ("labels", ["background"], "non-empty object"),
        ("channel_names", {"0": "T1", "2": "T2"}, "without gaps"),
        ("channel_names", {"zero": "CT"}, "channel indices"),
        ("numTraining", "3", "non-negative integer"),
        ("numTraining", -1, "non-negative integer"),
        ("file_ending", "nii.gz", "file ending"),
    ],
)
def test_bad_values_name_file_and_field(make_nnunet_dataset, field, value, fragment):
    root = make_nnunet_dataset()
    path = _edit_json(root, **{field: value})
    with pytest.raises(DatasetError) as err:
        load_dataset_info(root)
    message = str(err.value)
    assert str(path) in message and f"'{field}'" in message and fragment in message
    assert "Fix:" in message


def test_region_labels_are_rejected_clearly(make_nnunet_dataset):
    root = make_nnunet_dataset()
    _edit_json(root, labels={"background": 0, "whole tumour": [1, 2, 3], "enhancing": 3})
    with pytest.raises(DatasetError, match=r"region-based labels .* not supported yet"):
        load_dataset_info(root)


def test_invalid_json_and_missing_json(make_nnunet_dataset):
    root = make_nnunet_dataset()
    (root / "dataset.json").write_text('{"labels": {"background": 0,}')
    with pytest.raises(DatasetError, match=r"dataset\.json: not valid JSON"):
        load_dataset_info(root)
    (root / "dataset.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="top level must be a JSON object"):
        load_dataset_info(root)
    (root / "dataset.json").unlink()
    with pytest.raises(MedsegError, match=r"dataset\.json: file not found"):
        load_dataset_info(root)


def test_msd_missing_fields_and_bad_labels(make_msd_dataset):
    root = make_msd_dataset()
    path = _edit_json(root, labels={"zero": "background"})
    with pytest.raises(DatasetError) as err:
        load_dataset_info(root)
    assert str(path) in str(err.value) and "'labels'" in str(err.value) and "MSD keys" in str(err.value)
    _edit_json(root, labels={"0": "background"}, training=[{"label": "./labelsTr/x.nii.gz"}])
    with pytest.raises(DatasetError, match="'training'"):
        load_dataset_info(root)


def test_write_dataset_json_roundtrip_and_atomic(tmp_path):
    root = tmp_path / "Dataset994_Written"
    path = write_dataset_json(root, {0: "T2", 1: "ADC"}, {"background": 0, "PZ": 1}, 5, description="tiny")
    assert path == root / "dataset.json"
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json"]
    data = json.loads(path.read_text())
    assert data == {
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "PZ": 1},
        "numTraining": 5,
        "file_ending": ".nii.gz",
        "description": "tiny",
    }
    info = load_dataset_info(root)
    assert info.channel_names == {0: "T2", 1: "ADC"} and info.training == ()


def test_write_dataset_json_rejects_bad_values(tmp_path):
    with pytest.raises(DatasetError, match="'labels'"):
        write_dataset_json(tmp_path, {0: "CT"}, {"liver": 1}, 1)
    assert not (tmp_path / "dataset.json").exists()
