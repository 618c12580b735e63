"""summary.json against nnU-Net itself: nnunetv2's evaluation of medseg's predictions gives the numbers of medseg's
summary, and nnunetv2's ``load_summary_json`` reads medseg's file (medseg issue 21)."""

from __future__ import annotations

import json
import math
import multiprocessing.dummy
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from medseg.config import CONFIG_DIR, instantiate
from medseg.data.prepare import synthetic
from medseg.evaluation import evaluate_folder, medseg_metrics, read_summary
from medseg.evaluation.nnunet_metrics import NNUNET_METRICS, nnunet_regions
from medseg.workflows.evaluation import evaluate_model

pytest.importorskip("nnunetv2")
from nnunetv2.evaluation import evaluate_predictions
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.utilities.label_handling.label_handling import LabelManager

# The tiny 2-D UNet of tests/workflows/test_evaluation.py, untrained: its label maps are arbitrary but fixed by the
# seed, and they are medseg's prediction files, written as `medseg evaluate` writes them.
TINY = [
    "experiment=synthetic_unet",
    "model.channels=[8,16]",
    "model.strides=[2]",
    "model.num_res_units=1",
    "data.num_workers=0",
    "data.cache=none",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """``(run_dir, labels_dir, dataset_json)`` of a tiny evaluated run on three synthetic test phantoms."""
    data = tmp_path_factory.mktemp("nnunet_summary_data")
    root = synthetic.build(data, seed=3, num_train=4, num_test=3, shape=(32, 32, 10))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=TINY)
    with open_dict(cfg):
        cfg.paths.data_dir = str(data)
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels)
    task = instantiate(cfg.task, model=model, label_names=datamodule.label_names)
    run_dir = tmp_path_factory.mktemp("nnunet_summary_run")
    evaluate_model(task, datamodule, run_dir, device="cpu")
    return run_dir, Path(datamodule.info.test[0].label).parent, root / "dataset.json"


def _same(ours, theirs, what):
    """Equal to 1e-6, where an undefined value is ``None`` in medseg's strict JSON and NaN in nnU-Net's."""
    if ours is None or (isinstance(theirs, float) and math.isnan(theirs)):
        assert ours is None and math.isnan(theirs), f"{what}: {ours} vs {theirs}"
    else:
        assert ours == pytest.approx(theirs, abs=1e-6), what


def test_nnunet_evaluates_medseg_predictions_to_the_numbers_of_medseg_summary(run, tmp_path, monkeypatch):
    run_dir, labels_dir, dataset_json = run
    predictions = run_dir / "predictions"
    names = sorted(p.name for p in predictions.glob("*.nii.gz"))
    assert len(names) == 3 and all(not n.endswith("_0000.nii.gz") for n in names)  # no channel suffix
    assert set(names) <= {p.name for p in labels_dir.iterdir()}  # named as their references
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"label_manager": "LabelManager"}))
    out = tmp_path / "nnunet_summary.json"
    argv = ["nnUNetv2_evaluate_folder", str(labels_dir), str(predictions), "-djfile", str(dataset_json)]
    monkeypatch.setattr(sys, "argv", [*argv, "-pfile", str(plans), "-o", str(out), "-np", "1"])
    evaluate_predictions.evaluate_folder_entry_point()  # nnU-Net's own command, in its own worker process

    theirs = evaluate_predictions.load_summary_json(str(out))
    ours = evaluate_predictions.load_summary_json(str(run_dir / "summary.json"))  # nnU-Net reads medseg's file
    assert list(ours["mean"]) == list(theirs["mean"]) == [1, 2, 3, 4]  # int keys back from the label values
    assert len(ours["metric_per_case"]) == len(theirs["metric_per_case"]) == 3
    view = medseg_metrics(read_summary(run_dir / "summary.json"))
    labels = json.loads(dataset_json.read_text())["labels"]
    names_of = {value: name for name, value in labels.items()}
    defined = 0
    for mine, nnunet, medseg_case in zip(ours["metric_per_case"], theirs["metric_per_case"], view["metric_per_case"]):
        assert Path(mine["prediction_file"]).name == Path(nnunet["prediction_file"]).name
        assert Path(mine["reference_file"]).name == Path(nnunet["reference_file"]).name
        assert Path(medseg_case["prediction_file"]).name == Path(nnunet["prediction_file"]).name
        for label, metrics in nnunet["metrics"].items():
            for metric in NNUNET_METRICS:
                _same(mine["metrics"][label][metric], metrics[metric], f"{mine['prediction_file']} {label} {metric}")
            if not math.isnan(metrics["Dice"]):  # medseg's own Dice (MONAI) where nnU-Net's is defined
                defined += 1
                dice = medseg_case["metrics"][names_of[label]]["dice"]
                assert dice == pytest.approx(metrics["Dice"], abs=1e-6)
            assert medseg_case["metrics"][names_of[label]]["n_ref"] == metrics["n_ref"]
    assert defined >= 6  # the comparison is not vacuous
    for label, means in theirs["mean"].items():
        for metric in NNUNET_METRICS:
            _same(ours["mean"][label][metric], means[metric], f"mean {label} {metric}")
    for metric in NNUNET_METRICS:
        _same(ours["foreground_mean"][metric], theirs["foreground_mean"][metric], f"foreground_mean {metric}")


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.uint8), affine), path)


@pytest.mark.parametrize(
    "labels",
    [
        {"background": 0, "a": 1, "b": 2, "c": 3, "ignore": 4},  # labels with nnU-Net's ignore label
        {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},  # BraTS-like regions
    ],
    ids=["labels_with_ignore", "regions"],
)
def test_nnunets_folder_evaluation_matches_on_regions_ignore_and_empty_labels(labels, tmp_path, monkeypatch):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir(), ref_dir.mkdir()
    affine = np.diag([1.5, 0.8, 2.0, 1.0])
    rng = np.random.default_rng(0)
    for index in range(3):
        reference = np.zeros((14, 12, 9), dtype=np.uint8)
        reference[2:9, 2:8, 1:6] = 1
        reference[4:7, 3:6, 2:5] = 2
        if index != 1:  # case 1 has no label 3 (and predicts none): undefined for nnU-Net, 1 for medseg
            reference[5:6, 4:5, 3:4] = 3
        if "ignore" in labels:
            reference[10:13, :, :] = labels["ignore"]
        prediction = np.roll(np.where(reference == labels.get("ignore", -1), 0, reference), index, axis=0)
        prediction[rng.random(prediction.shape) < 0.05] = 1  # scattered false positives
        if index == 1:
            prediction[prediction == 3] = 0
        _write(ref_dir / f"case{index}.nii.gz", reference, affine)
        _write(pred_dir / f"case{index}.nii.gz", prediction, affine)
    summary = evaluate_folder(pred_dir, ref_dir, labels, output=tmp_path / "summary.json")

    manager = LabelManager(labels, regions_class_order=[1, 2, 3] if "whole" in labels else None)
    regions = manager.foreground_regions if manager.has_regions else manager.foreground_labels
    assert nnunet_regions(labels) == list(regions)
    # nnU-Net's code as it is, with a thread pool in place of its process pool (same results, no start-up cost)
    monkeypatch.setattr(
        evaluate_predictions, "multiprocessing", SimpleNamespace(get_context=lambda _: multiprocessing.dummy)
    )
    theirs = evaluate_predictions.compute_metrics_on_folder(
        str(ref_dir), str(pred_dir), str(tmp_path / "nnunet.json"), SimpleITKIO(), ".nii.gz", regions,
        manager.ignore_label, num_processes=1,
    )  # fmt: skip
    theirs = evaluate_predictions.load_summary_json(str(tmp_path / "nnunet.json"))
    ours = evaluate_predictions.load_summary_json(str(tmp_path / "summary.json"))
    assert list(ours["mean"]) == list(theirs["mean"]) == list(regions)  # "(1, 2, 3)" read back as a tuple
    undefined = 0
    for mine, nnunet in zip(ours["metric_per_case"], theirs["metric_per_case"], strict=True):
        assert mine["prediction_file"] == nnunet["prediction_file"]
        assert mine["reference_file"] == nnunet["reference_file"]
        for region, metrics in nnunet["metrics"].items():
            undefined += math.isnan(metrics["Dice"])
            for metric in NNUNET_METRICS:
                _same(mine["metrics"][region][metric], metrics[metric], f"{region} {metric}")
    assert undefined == 1  # label 3 of case 1
    for region, means in theirs["mean"].items():
        for metric in NNUNET_METRICS:
            _same(ours["mean"][region][metric], means[metric], f"mean {region} {metric}")
    for metric in NNUNET_METRICS:
        _same(ours["foreground_mean"][metric], theirs["foreground_mean"][metric], f"foreground_mean {metric}")
    view = medseg_metrics(summary)
    name = "c" if "c" in labels else "enhancing"
    assert view["metric_per_case"][1]["metrics"][name]["dice"] == 1.0  # medseg's policy: absent and not predicted
