"""A run folder predicts without its training dataset: ``run_data.json`` keeps what prediction needs from it."""

from __future__ import annotations

import json
import shutil

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from medseg.cli import main
from medseg.data.dicom import write_dicom_series
from medseg.data.io import load_image
from medseg.errors import ConfigError
from medseg.inference.cases import discover_cases
from medseg.inference.dicom_seg import GENERIC_CODE, seg_algorithm, write_seg_for_case
from medseg.inference.loaded import LoadedModel
from medseg.inference.run_data import read_run_data, write_run_data
from medseg.inference.sources import _data_from_dataset, load_run
from medseg.runs import RUN_DATA


def predict(run, scan, out) -> np.ndarray:
    code = main(["predict", "-m", str(run), "-i", str(scan), "-o", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0
    return np.asarray(nib.load(out / scan.name).dataobj)


@pytest.fixture
def run_without_dataset(dense_run, tmp_path, monkeypatch):
    """A copy of the run whose config points at a dataset folder that does not exist (another machine)."""
    copy = shutil.copytree(dense_run, tmp_path / "run")
    config = OmegaConf.load(copy / ".hydra" / "config.yaml")
    config.paths.data_dir = str(tmp_path / "gone")
    config.data.data_root = str(tmp_path / "gone")
    OmegaConf.save(config, copy / ".hydra" / "config.yaml")
    monkeypatch.setenv("MEDSEG_DATA", str(tmp_path / "also_gone"))
    return copy


def test_training_keeps_what_the_dataset_would_give(dense_run):
    stored = read_run_data(dense_run)
    assert stored is not None
    assert stored == _data_from_dataset(OmegaConf.load(dense_run / ".hydra" / "config.yaml"))


def test_a_run_predicts_the_same_without_its_dataset(dense_run, run_without_dataset, phantom_scan, tmp_path):
    with_data = predict(dense_run, phantom_scan["path"], tmp_path / "a")
    without = predict(run_without_dataset, phantom_scan["path"], tmp_path / "b")
    np.testing.assert_array_equal(with_data, without)
    assert load_run(run_without_dataset, "cpu").label_names == load_run(dense_run, "cpu").label_names


def test_an_older_run_without_run_data_still_needs_its_dataset(run_without_dataset):
    (run_without_dataset / RUN_DATA).unlink()
    with pytest.raises(ConfigError, match="predates run_data.json.*MEDSEG_DATA"):
        load_run(run_without_dataset, "cpu")


def test_damaged_run_data_is_named_with_the_fix(run_without_dataset):
    (run_without_dataset / RUN_DATA).write_text("{not json")
    with pytest.raises(ConfigError, match=f"{RUN_DATA} is not readable run data .* Delete it"):
        load_run(run_without_dataset, "cpu")


def test_configs_with_nested_omegaconf_values_are_written_as_plain_json(tmp_path):
    """``spacing: median`` resolved into a plain copy keeps its other values as ListConfig (the quickstart's case)."""
    preprocess = [{"_target_": "monai.transforms.Spacingd", "keys": OmegaConf.create(["image", "label"]),
                   "pixdim": (2.0, 2.0, 4.0)}, OmegaConf.create({"_target_": "x", "a": [1, {"b": 2}]})]  # fmt: skip
    write_run_data(tmp_path, "Dataset1_X", {"background": 0, "organ": 1}, 1, preprocess)
    stored = read_run_data(tmp_path)
    assert stored.preprocess == [
        {"_target_": "monai.transforms.Spacingd", "keys": ["image", "label"], "pixdim": [2.0, 2.0, 4.0]},
        {"_target_": "x", "a": [1, {"b": 2}]},
    ]
    assert stored.label_names == {0: "background", 1: "organ"} and stored.num_classes == 2


CODES = {
    "organ": {
        "category": ["123037004", "SCT", "Anatomical Structure"],
        "type": {"CodeValue": "10200004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Liver"},
    }
}


def test_label_codes_travel_in_the_run_data_into_the_seg(tmp_path):
    """dataset.json's label_codes are kept in run_data.json, so a SEG written from the run folder alone has them."""
    labels = {"background": 0, "organ": 1, "other": 2}
    write_run_data(tmp_path / "run", "Dataset1_X", labels, 1, [], label_codes=OmegaConf.create(CODES))
    stored = read_run_data(tmp_path / "run")
    liver = ["10200004", "SCT", "Liver"]
    assert stored.label_codes == {"organ": {"category": CODES["organ"]["category"], "type": liver}}
    assert json.loads((tmp_path / "run" / RUN_DATA).read_text())["label_codes"] == stored.label_codes

    series = write_dicom_series(np.zeros((6, 5, 4)), np.diag([0.8, 0.9, 2.0, 1.0]), tmp_path / "scan")
    (case,) = discover_cases(series)
    loaded = LoadedModel(model=None, kind="dense", label_names=stored.label_names, source="run x")
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[1:4, 1:3, 1:3], mask[4, 4, 3] = 1, 2
    algorithm = seg_algorithm(loaded, prompted=False, codes=stored.label_codes)
    seg = hd.seg.segread(
        str(write_seg_for_case(case, mask, algorithm, tmp_path / "out", affine=load_image(series).affine))
    )
    organ, other = seg.get_segment_description(1), seg.get_segment_description(2)
    assert (organ.segment_label, organ.segmented_property_type.value) == ("organ", "10200004")
    assert organ.segmented_property_category.value == "123037004"
    assert other.segmented_property_type.value == GENERIC_CODE.value  # no code given: the generic one

    write_run_data(tmp_path / "plain", "Dataset1_X", labels, 1, [])
    assert "label_codes" not in json.loads((tmp_path / "plain" / RUN_DATA).read_text())
    assert read_run_data(tmp_path / "plain").label_codes == {}


def test_malformed_or_unknown_label_codes_are_refused_when_the_run_is_written(tmp_path):
    labels = {"background": 0, "organ": 1}
    broken = {"organ": {"category": ["1", "SCT", "A"], "type": ["10200004", "SCT"]}}
    with pytest.raises(ConfigError, match=r"Dataset1_X/dataset.json label_codes\['organ'\]\.type must be"):
        write_run_data(tmp_path, "Dataset1_X", labels, 1, [], label_codes=broken)
    with pytest.raises(ConfigError, match="'liver', not a label of its \"labels\" \\(background, organ\\)"):
        write_run_data(tmp_path, "Dataset1_X", labels, 1, [], label_codes={"liver": CODES["organ"]})
    assert not (tmp_path / RUN_DATA).exists()


def test_a_run_folders_label_codes_reach_the_seg_that_predict_writes(dense_run, phantom_scan, tmp_path):
    """`medseg predict -m RUN` on a DICOM series writes the codes the run kept, with no dataset at hand."""
    from medseg.inference.preflight import SEG_SUFFIX

    run = shutil.copytree(dense_run, tmp_path / "run")
    stored = read_run_data(run)
    names = {name: value for value, name in stored.label_names.items()}
    organ = next(name for value, name in sorted(stored.label_names.items()) if value)
    codes = {organ: {"category": CODES["organ"]["category"], "type": ["10200004", "SCT", "Liver"]}}
    write_run_data(run, stored.dataset, names, stored.num_channels, stored.preprocess, label_codes=codes)
    assert load_run(run, "cpu").extras["label_codes"] == codes
    series = write_dicom_series(np.round(phantom_scan["image"]), phantom_scan["affine"], tmp_path / "series")
    code = main(["predict", "-m", str(run), "-i", str(series), "-o", str(tmp_path / "out"), "--device", "cpu",
                 "--no-progress"])  # fmt: skip
    assert code == 0
    (written,) = (tmp_path / "out").glob(f"*{SEG_SUFFIX}")
    seg = hd.seg.segread(str(written))
    numbers = {seg.get_segment_description(n).segment_label: n for n in seg.segment_numbers}
    assert seg.get_segment_description(numbers[organ]).segmented_property_type.value == "10200004"
