"""nnU-Net v2 as a ``medseg train`` arm, end to end on tiny synthetic phantoms on CPU (a few iterations).

One run (module fixture) is checked for what makes it comparable with the other arms: nnU-Net trained on the run's
split (label-fraction subset, fold's validation cases) for exactly ``trainer.max_steps`` iterations, its folders live
under the run folder, its predictions lie on each test image's own grid (the phantoms include non-RAS and oblique
cases), and ``summary.json`` holds what medseg's metric functions give on those files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from medseg.config import CONFIG_DIR
from medseg.data.formats import load_dataset_info
from medseg.data.prepare import synthetic
from medseg.data.splits import label_fraction_subset, load_or_create_splits
from medseg.errors import ConfigError
from medseg.evaluation import medseg_metrics
from medseg.evaluation.metrics import case_metrics, spacing_from_affine
from medseg.workflows.training import train

pytest.importorskip("nnunetv2")
pytestmark = pytest.mark.slow  # nnU-Net's spawned preprocessing workers: about a minute on 2 idle cores

STEPS = 3  # two nnU-Net epochs of 2 iterations, the second cut to 1: the budget, not the epoch, ends training
TINY = [
    "trainer=cpu",
    "data.label_fraction=0.5",
    "+nnunet=2d",
    f"trainer.max_steps={STEPS}",
    "nnunet.iterations_per_epoch=2",
    "nnunet.val_iterations_per_epoch=1",
    "nnunet.num_processes=1",
    "nnunet.da_processes=0",
    "nnunet.use_mirroring=false",
]


def compose_run(overrides: list[str], run_dir: Path, data_root: Path) -> DictConfig:
    """The config of ``medseg train <overrides>`` with the run folder and data root set as Hydra would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.paths.data_dir = str(data_root)
    return cfg


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nnunet_phantoms")
    synthetic.build(root, seed=2, num_train=8, num_test=2, shape=(32, 32, 10))
    return root


@pytest.fixture(scope="module")
def arm(phantoms, tmp_path_factory):
    """One trained and evaluated nnU-Net arm: ``(run_dir, metrics, cfg)``."""
    run_dir = tmp_path_factory.mktemp("nnunet_run") / "run"
    cfg = compose_run(TINY, run_dir, phantoms)
    metrics = train(cfg)
    return run_dir, metrics, cfg


def _expected_split(phantoms: Path) -> tuple[list[str], list[str]]:
    """The fold-0 split at label fraction 0.5 from medseg's split functions (what every medseg arm trains on)."""
    info = load_dataset_info(phantoms / "Dataset990_Synthetic")
    splits = load_or_create_splits(info.root, sorted(c.case_id for c in info.training), 4, 12345)
    return label_fraction_subset(splits[0]["train"], 0.5, 0), list(splits[0]["val"])


def test_nnunet_trains_on_the_runs_split_for_the_step_budget(arm, phantoms):
    run_dir, _, cfg = arm
    train_ids, val_ids = _expected_split(phantoms)
    assert 0 < len(train_ids) < 6  # the label fraction really dropped cases
    result = json.loads((run_dir / "nnunet" / "result.json").read_text())
    assert result["train_keys"] == train_ids and result["val_keys"] == val_ids  # what nnU-Net's trainer used
    preprocessed = run_dir / "nnunet" / "preprocessed" / "Dataset990_Synthetic"
    assert json.loads((preprocessed / "splits_final.json").read_text()) == [{"train": train_ids, "val": val_ids}]
    raw = run_dir / "nnunet" / "raw" / "Dataset990_Synthetic"
    assert sorted(p.name for p in (raw / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in train_ids + val_ids)
    assert "verify_dataset_integrity Done" in (run_dir / "nnunet" / "nnunet.log").read_text(encoding="utf-8")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_trained"] == STEPS == result["steps_trained"] and result["epochs"] == 2
    assert summary["num_train_cases"] == len(train_ids) and summary["model"] == "nnunet-2d"
    assert summary["nnunet"]["initial_lr"] == pytest.approx(1e-2)  # nnU-Net's own, not task.optimizer.lr
    assert summary["trainable_params"] == result["trainable_params"] > 0
    assert json.loads((run_dir / "train_state.json").read_text())["status"] == "finished"
    # nnU-Net's folders are the run's: results under it, nothing left in this process's environment
    assert Path(result["output_folder"]).is_relative_to(run_dir / "nnunet" / "results")
    assert all(str(run_dir) not in value for key, value in os.environ.items() if key.startswith("nnUNet_"))
    with pytest.raises(ConfigError, match=r"holds a finished run \(nnU-Net arms are neither continued"):
        train(cfg)  # the same command again: the finished run is kept


def test_predictions_lie_on_each_test_images_native_grid(arm, phantoms):
    run_dir, _, _ = arm
    info = load_dataset_info(phantoms / "Dataset990_Synthetic")
    assert {nib.aff2axcodes(nib.load(c.images[0]).affine) for c in info.test} != {("R", "A", "S")}  # not all RAS
    predicted = sorted(p.name for p in (run_dir / "predictions").iterdir())
    assert predicted == sorted(f"{c.case_id}.nii.gz" for c in info.test)  # label maps only
    for case in info.test:
        image, prediction = nib.load(case.images[0]), nib.load(run_dir / "predictions" / f"{case.case_id}.nii.gz")
        assert prediction.shape == image.shape
        np.testing.assert_allclose(prediction.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asanyarray(prediction.dataobj))) <= set(info.labels.values())


def test_summary_equals_medsegs_metrics_on_the_prediction_files(arm, phantoms):
    run_dir, metrics, _ = arm
    info = load_dataset_info(phantoms / "Dataset990_Synthetic")
    summary = json.loads((run_dir / "summary.json").read_text())
    by_case = {entry["case_id"]: entry["metrics"] for entry in medseg_metrics(summary)["metric_per_case"]}
    assert sorted(by_case) == sorted(c.case_id for c in info.test)
    dice = {name: [] for name in info.foreground_labels}
    for case in info.test:
        prediction = nib.load(run_dir / "predictions" / f"{case.case_id}.nii.gz")
        reference = nib.load(case.label)
        direct = case_metrics(
            np.rint(np.asanyarray(prediction.dataobj)).astype(np.int64),
            np.rint(np.asanyarray(reference.dataobj)).astype(np.int64),
            spacing_from_affine(reference.affine), info.labels, 2.0,
        )  # fmt: skip
        for name in info.foreground_labels:
            for metric in ("dice", "nsd", "hd95"):
                assert by_case[case.case_id][name][metric] == pytest.approx(direct[name][metric], nan_ok=True)
            dice[name].append(direct[name]["dice"])
    foreground = float(np.mean([np.mean(values) for values in dice.values()]))
    assert metrics["test/dice_fg"] == pytest.approx(foreground) == summary["foreground_mean"]["dice"]
    assert {"test/dice_fg", "test/nsd_fg"} <= set(metrics)
