"""Converters on tiny fabricated downloads: layout, dataset.json, channel splitting, label remapping, atomicity."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import medseg.data.convert.common as common
from medseg.data.convert import convert_dataset
from medseg.data.formats import load_dataset_info
from medseg.data.validate import validate_dataset
from medseg.errors import ConfigError, DatasetError

AFFINE = np.diag([0.8, 0.9, 2.5, 1.0])
AFFINE[:3, 3] = [-10.0, 5.0, 30.0]


def _save(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def _label(rng, values, shape=(8, 8, 8)):
    data = rng.choice(np.asarray(values, dtype=np.uint8), size=shape)
    data.flat[: len(values)] = values  # every value present
    return data


def _load(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def _convert(fmt, source, tmp_path, **kwargs):
    return convert_dataset(
        fmt, source, dataset_id=kwargs.pop("dataset_id", 501), output=tmp_path / "out", progress=False, **kwargs
    )


@pytest.fixture
def msd_brain(tmp_path):
    """Task01_BrainTumour-like: 4 modalities in 4D files, 2 training cases, 1 test case, a macOS ._ file."""
    rng = np.random.default_rng(0)
    task = tmp_path / "Task01_BrainTumour"
    images = {}
    for case in ("BRATS_001", "BRATS_002", "BRATS_485"):
        images[case] = rng.normal(size=(8, 8, 8, 4)).astype(np.float32)
        folder = "imagesTs" if case == "BRATS_485" else "imagesTr"
        _save(task / folder / f"{case}.nii.gz", images[case])
        if folder == "imagesTr":
            _save(task / "labelsTr" / f"{case}.nii.gz", _label(rng, [0, 1, 2, 3]))
    (task / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    meta = {
        "name": "BRATS",
        "description": "Gliomas",
        "licence": "CC-BY-SA 4.0",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": 2,
        "training": [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("BRATS_001", "BRATS_002")
        ],
        "test": ["./imagesTs/BRATS_485.nii.gz"],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    return task, images


def test_msd_splits_4d_channels_in_modality_order(msd_brain, tmp_path):
    task, images = msd_brain
    out = _convert("msd", task, tmp_path)
    assert out.name == "Dataset501_BrainTumour"
    assert validate_dataset(out) == []
    info = load_dataset_info(out)
    assert info.channel_names == {0: "FLAIR", 1: "T1w", 2: "t1gd", 3: "T2w"}
    assert info.labels == {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert [c.case_id for c in info.training] == ["BRATS_001", "BRATS_002"]
    assert [c.case_id for c in info.test] == ["BRATS_485"] and info.test[0].label is None
    for case in info.training + info.test:
        assert len(case.images) == 4
        for channel, path in enumerate(case.images):
            data, affine = _load(path)
            assert data.shape == (8, 8, 8)
            np.testing.assert_array_equal(data, images[case.case_id][..., channel])
            np.testing.assert_allclose(affine, AFFINE)
    source_label = _load(task / "labelsTr" / "BRATS_002.nii.gz")[0]
    np.testing.assert_array_equal(_load(info.training[1].label)[0], source_label)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["licence"] == "CC-BY-SA 4.0" and "training" not in meta
    assert not any(p.name.startswith("._") for p in out.rglob("*"))


def test_msd_reports_missing_listed_file(msd_brain, tmp_path):
    task, _ = msd_brain
    (task / "labelsTr" / "BRATS_002.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"labelsTr/BRATS_002\.nii\.gz.*training label"):
        _convert("msd", task, tmp_path)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_msd_rejects_a_4d_file_with_the_wrong_channel_count(msd_brain, tmp_path):
    task, _ = msd_brain
    _save(task / "imagesTr" / "BRATS_002.nii.gz", np.zeros((8, 8, 8, 3), dtype=np.float32))
    with pytest.raises(DatasetError, match="4 channels"):
        _convert("msd", task, tmp_path)
    assert list((tmp_path / "out").iterdir()) == []  # the half-built dataset was removed


def test_btcv_names_thirteen_organs_and_keeps_test_images(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "download" / "RawData"
    for number in ("0001", "0002"):
        _save(raw / "Training" / "img" / f"img{number}.nii.gz", rng.integers(-1000, 1000, (8, 8, 8), dtype=np.int16))
        _save(raw / "Training" / "label" / f"label{number}.nii.gz", _label(rng, list(range(14))))
    _save(raw / "Testing" / "img" / "img0061.nii.gz", np.zeros((8, 8, 8), dtype=np.int16))
    out = _convert("btcv", tmp_path / "download", tmp_path, dataset_id=12)
    assert out.name == "Dataset012_BTCV" and validate_dataset(out) == []
    info = load_dataset_info(out)
    assert len(info.labels) == 14 and info.labels["liver"] == 6 and info.labels["left_adrenal_gland"] == 13
    assert info.channel_names == {0: "CT"}
    assert [c.case_id for c in info.training] == ["BTCV_0001", "BTCV_0002"]
    assert [c.case_id for c in info.test] == ["BTCV_0061"]
    np.testing.assert_array_equal(
        _load(info.training[0].images[0])[0], _load(raw / "Training" / "img" / "img0001.nii.gz")[0]
    )
    assert _load(info.training[0].label)[0].dtype == np.uint8

    (raw / "Training" / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"label0002\.nii\.gz: expected the label of img0002"):
        _convert("btcv", tmp_path / "download", tmp_path, dataset_id=13)


def test_kits_keeps_labels_and_explains_missing_images(tmp_path):
    rng = np.random.default_rng(2)
    dataset = tmp_path / "kits23" / "dataset"
    for case in ("case_00000", "case_00001"):
        _save(dataset / case / "imaging.nii.gz", rng.normal(size=(8, 8, 8)).astype(np.float32))
        _save(dataset / case / "segmentation.nii.gz", _label(rng, [0, 1, 2, 3]))
    out = _convert("kits", tmp_path / "kits23", tmp_path, dataset_id=220)
    assert out.name == "Dataset220_KiTS23" and validate_dataset(out) == []
    info = load_dataset_info(out)
    assert info.labels == {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
    np.testing.assert_array_equal(
        _load(info.training[1].label)[0], _load(dataset / "case_00001" / "segmentation.nii.gz")[0]
    )
    (dataset / "case_00001" / "imaging.nii.gz").unlink()
    with pytest.raises(DatasetError, match="kits23_download_data"):
        _convert("kits", tmp_path / "kits23", tmp_path, dataset_id=221)


def test_amos_separates_ct_from_mri_and_uses_validation_as_test(tmp_path):
    rng = np.random.default_rng(3)
    amos = tmp_path / "amos22"
    names = [
        "spleen",
        "right kidney",
        "left kidney",
        "gall bladder",
        "esophagus",
        "liver",
        "stomach",
        "aorta",
        "postcava",
        "pancreas",
        "right adrenal gland",
        "left adrenal gland",
        "duodenum",
        "bladder",
        "prostate/uterus",
    ]
    meta = {"name": "AMOS", "labels": {"0": "background", **{str(i + 1): n for i, n in enumerate(names)}}}
    amos.mkdir()
    (amos / "dataset.json").write_text(json.dumps(meta))
    for folder, case in (("Tr", "amos_0001"), ("Tr", "amos_0005"), ("Tr", "amos_0507"), ("Va", "amos_0008")):
        _save(amos / f"images{folder}" / f"{case}.nii.gz", rng.normal(size=(8, 8, 8)).astype(np.float32))
        _save(amos / f"labels{folder}" / f"{case}.nii.gz", _label(rng, list(range(16))))
    ct = load_dataset_info(_convert("amos", tmp_path, tmp_path, dataset_id=218))
    assert [c.case_id for c in ct.training] == ["amos_0001", "amos_0005"]
    assert [c.case_id for c in ct.test] == ["amos_0008"] and ct.test[0].label is not None
    assert ct.channel_names == {0: "CT"} and len(ct.labels) == 16 and ct.labels["gall_bladder"] == 4
    mri_path = _convert("amos", amos, tmp_path, dataset_id=219, modality="mri")
    assert validate_dataset(mri_path) == []
    mri = load_dataset_info(mri_path)
    assert [c.case_id for c in mri.training] == ["amos_0507"] and mri.test == () and mri.channel_names == {0: "MRI"}
    with pytest.raises(ConfigError, match="modality"):
        _convert("amos", amos, tmp_path, dataset_id=217, modality="pet")


def _brats_source(tmp_path, rng, seg_values=(0, 1, 2, 4)):
    source = tmp_path / "BraTS2021_Training_Data"
    channels = {}
    for case in ("BraTS2021_00000", "BraTS2021_00002"):
        for modality in ("t1", "t1ce", "t2", "flair"):
            channels[case, modality] = rng.normal(size=(8, 8, 8)).astype(np.float32)
            _save(source / case / f"{case}_{modality}.nii.gz", channels[case, modality])
        _save(source / case / f"{case}_seg.nii.gz", _label(rng, list(seg_values)))
    return source, channels


def test_brats_orders_channels_and_remaps_4_to_3(tmp_path):
    source, channels = _brats_source(tmp_path, np.random.default_rng(4))
    out = _convert("brats", source, tmp_path, dataset_id=137)
    assert out.name == "Dataset137_BraTS2021" and validate_dataset(out) == []
    info = load_dataset_info(out)
    assert info.channel_names == {0: "T1", 1: "T1CE", 2: "T2", 3: "FLAIR"}
    assert info.labels == {"background": 0, "necrotic_tumor_core": 1, "peritumoral_edema": 2, "enhancing_tumor": 3}
    for case in info.training:
        for path, modality in zip(case.images, ("t1", "t1ce", "t2", "flair"), strict=True):
            np.testing.assert_array_equal(_load(path)[0], channels[case.case_id, modality])
        original = _load(source / case.case_id / f"{case.case_id}_seg.nii.gz")[0]
        converted = _load(case.label)[0]
        expected = np.where(original == 4, 3, original)
        np.testing.assert_array_equal(converted, expected)
        assert 4 not in converted and 3 in converted


def test_brats_rejects_unknown_label_values_and_missing_channels(tmp_path):
    source, _ = _brats_source(tmp_path, np.random.default_rng(5), seg_values=(0, 1, 2, 3))
    with pytest.raises(DatasetError, match=r"values \[3\] are not among"):
        _convert("brats", source, tmp_path)
    (source / "BraTS2021_00002" / "BraTS2021_00002_t1ce.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"BraTS2021_00002 lacks BraTS2021_00002_t1ce\.nii\.gz"):
        _convert("brats", source, tmp_path)


def test_existing_dataset_needs_force_and_ids_are_unique(tmp_path):
    source, _ = _brats_source(tmp_path, np.random.default_rng(6))
    out = _convert("brats", source, tmp_path, dataset_id=137)
    stamp = (out / "dataset.json").stat().st_mtime_ns
    with pytest.raises(DatasetError, match="force"):
        _convert("brats", source, tmp_path, dataset_id=137)
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    assert _convert("brats", source, tmp_path, dataset_id=137, force=True) == out
    with pytest.raises(DatasetError, match="already used by Dataset137_BraTS2021"):
        _convert("brats", source, tmp_path, dataset_id=137, name="Other")


def test_failure_while_writing_leaves_no_dataset(tmp_path, monkeypatch):
    source, _ = _brats_source(tmp_path, np.random.default_rng(7))
    real, calls = common._write_label, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(*args)

    monkeypatch.setattr(common, "_write_label", failing)
    with pytest.raises(DatasetError, match=r"failed \(disk full \(simulated\).*partial build was removed"):
        _convert("brats", source, tmp_path)
    assert len(calls) == 2 and list((tmp_path / "out").iterdir()) == []


def test_an_output_that_is_a_file_is_refused_before_the_source_is_read(tmp_path, monkeypatch):
    source, _ = _brats_source(tmp_path, np.random.default_rng(9))
    output = tmp_path / "out"
    output.write_text("my notes\n")
    with pytest.raises(ConfigError, match=r"datasets \(from --output\) is not a folder \(.*out is a file\)"):
        convert_dataset("brats", source, dataset_id=5, output=output / "datasets", progress=False)
    assert output.read_text() == "my notes\n"


def test_unknown_format_bad_id_and_missing_source(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)Unknown dataset format 'nifti'.*brats"):
        convert_dataset("nifti", tmp_path, dataset_id=1, output=tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        convert_dataset("btcv", tmp_path / "nowhere", dataset_id=1, output=tmp_path)
    with pytest.raises(DatasetError, match=r"RawData/Training"):
        convert_dataset("btcv", tmp_path, dataset_id=1, output=tmp_path)
    source, _ = _brats_source(tmp_path, np.random.default_rng(8))
    with pytest.raises(ConfigError, match="1 to 999"):
        convert_dataset("brats", source, dataset_id=1000, output=tmp_path)
    with pytest.raises(ConfigError, match="no spaces"):
        convert_dataset("brats", source, dataset_id=5, name="My Data", output=tmp_path)
