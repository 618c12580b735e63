"""`medseg classify`: every protocol learns a task separable by construction; the run folder reloads for prediction."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from medseg.cli import main
from medseg.config import CONFIG_DIR
from medseg.data.prepare.writing import write_nifti
from medseg.inference.classified import load_classifier, predict_probabilities
from medseg.workflows.classification.training import train_classifier

CLASSES = ("small", "medium", "large")
TINY_MAE = "+model.arch={depth:2,embed_dim:32,num_heads:2,img_size:32}"


def _disk(kind: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A bright disk of radius 4, 9 or 14 px at a random centre on a noisy background: separable by its area."""
    centre = rng.uniform(10, 22, size=2)
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    inside = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (4, 9, 14)[kind] ** 2
    return (100 + 80 * inside + rng.normal(0, 5, size=(size, size))).astype(np.float32)


def _disk_table(root: Path, count: int, n_train: int, n_val: int, slices: int, seed: int) -> Path:
    """``count`` NIfTI images of ``slices`` slices, each slice a disk of the case's size class, with a site column."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        kind, split = i % 3, ("train" if i < n_train else "val" if i < n_train + n_val else "test")
        name = f"images/c{i:02d}.nii.gz"
        write_nifti(np.stack([_disk(kind, rng) for _ in range(slices)], axis=-1), np.eye(4), root / name)
        rows.append([f"c{i:02d}", name, CLASSES[kind], "AB"[i % 2], split])
    with open(root / "table.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["case_id", "image", "size", "site", "split"], *rows])
    return root / "table.csv"


@pytest.fixture(scope="module")
def disks_table(tmp_path_factory) -> Path:
    """90 one-slice NIfTI images of three disk sizes (60 train, 12 val, 18 test) with a site column."""
    return _disk_table(tmp_path_factory.mktemp("disks"), 90, 60, 12, slices=1, seed=0)


def _config(table: Path, run_dir: Path, protocol: str, extra=()):
    overrides = [
        f"data.dataset={table}", "data.label_columns=[size]", "data.label_kind=multiclass",
        f"data.classes=[{','.join(CLASSES)}]", "data.subgroup_columns=[site]", "data.size=32",
        "data.preprocess.spacing=[1.0,1.0,1.0]", "data.batch_size=8", "backbone=mae_vit_base", "init=scratch",
        TINY_MAE, "model.img_size=32", f"protocol={protocol}", "trainer=cpu", "logger=none", "trainer.max_steps=40",
        "trainer.check_val_every_n_epoch=1", "task.optimizer.lr=3e-3", f"paths.results_dir={run_dir}",
        "seed=1", *(["protocol.k=5"] if protocol == "knn" else []), *extra,
    ]  # fmt: skip
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("classify", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir / "run")
    return cfg


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("protocol", ["knn", "linear", "peft", "full"])
def test_every_protocol_beats_chance_on_a_separable_task(protocol, disks_table, tmp_path):
    cfg = _config(disks_table, tmp_path, protocol)
    assert cfg.adapter.method == {"knn": "frozen", "linear": "frozen", "peft": "lora", "full": "full"}[protocol]
    metrics = train_classifier(cfg)
    assert metrics["test/accuracy"] >= 0.6, metrics  # chance: 1/3
    assert metrics["test/auroc_macro"] >= 0.8, metrics  # chance: 0.5
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["protocol"] == protocol and summary["n_cases"] == 18
    assert set(summary["subgroups"]["site"]) == {"A", "B"}
    assert (tmp_path / "run" / "confusion_matrix.png").is_file()
    if protocol in ("knn", "linear"):
        assert summary["feature_cache_misses"] == 90 and summary["trainable_params"] < 200
    # the run folder reloads into the same model: the probabilities of a test case are reproduced from its file
    loaded = load_classifier(tmp_path / "run")
    row = summary["metric_per_case"][0]
    probs = predict_probabilities(loaded, str(disks_table.parent / "images" / f"{row['case_id']}.nii.gz"))
    np.testing.assert_allclose(probs, [row["probabilities"][c] for c in CLASSES], atol=1e-4)


def test_linear_probe_reuses_the_features_knn_cached(disks_table, tmp_path):
    train_classifier(_config(disks_table, tmp_path, "knn"))
    cfg = _config(disks_table, tmp_path, "linear")
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "linear")
    train_classifier(cfg)
    summary = json.loads((tmp_path / "linear" / "summary.json").read_text())
    assert (summary["feature_cache_hits"], summary["feature_cache_misses"]) == (90, 0)


def test_bf16_ladder_extracts_its_own_features(disks_table, tmp_path):
    """trainer.precision=bf16-mixed makes the frozen features bf16 too: fp32 features cached by an earlier run are
    not reused for them, and the probe still learns the task."""
    train_classifier(_config(disks_table, tmp_path, "knn"))
    cfg = _config(disks_table, tmp_path, "linear", ["trainer.precision=bf16-mixed"])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "bf16")
    metrics = train_classifier(cfg)
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert (summary["feature_cache_hits"], summary["feature_cache_misses"]) == (0, 90)
    assert metrics["test/accuracy"] >= 0.6, metrics


def test_medseg_predict_writes_a_probability_table_for_a_classifier_run(disks_table, tmp_path, capsys):
    cfg = _config(disks_table, tmp_path, "linear")
    train_classifier(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rows = summary["metric_per_case"][:3]
    for row in rows:
        name = f"{row['case_id']}.nii.gz"
        (inputs / name).write_bytes((disks_table.parent / "images" / name).read_bytes())
    write_nifti(np.full((32, 32, 1), np.nan, np.float32), np.eye(4), inputs / "broken.nii.gz")

    code = main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "run")])
    assert code == 1  # one case failed, the others were written
    assert "broken" in capsys.readouterr().err
    with open(tmp_path / "out" / "probabilities.csv", newline="") as handle:
        table = {r["case"]: r for r in csv.DictReader(handle)}
    assert set(table) == {row["case_id"] for row in rows}
    for row in rows:
        got = table[row["case_id"]]
        np.testing.assert_allclose([float(got[f"p_{c}"]) for c in CLASSES], [row["probabilities"][c] for c in CLASSES],
                                   atol=1e-4)  # fmt: skip
        assert got["prediction"] == max(CLASSES, key=lambda c: row["probabilities"][c])
    assert main(["predict", "-i", str(inputs), "-o", str(tmp_path / "o2"), "-m", str(tmp_path / "run"), "--tta"]) == 2
    assert "is a classifier" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cylinders_table(tmp_path_factory) -> Path:
    """36 NIfTI volumes (32 x 32 x 4) holding a disk of one of three sizes on every slice (24 train, 6 val, 6 test)."""
    return _disk_table(tmp_path_factory.mktemp("cylinders"), 36, 24, 6, slices=4, seed=1)


@pytest.mark.parametrize("protocol", ["knn", "linear", "peft", "full"])
def test_every_protocol_learns_from_3d_volumes(protocol, cylinders_table, tmp_path):
    """The same switch on volumes: slice-wise features aggregated over the 4 slices of each volume."""
    volumes = ["data.spatial_dims=3", "data.num_slices=4", "trainer.max_steps=30"]
    cfg = _config(cylinders_table, tmp_path, protocol, volumes)
    metrics = train_classifier(cfg)
    assert metrics["test/accuracy"] >= 0.6 and metrics["test/auroc_macro"] >= 0.8, metrics  # chance: 1/3 and 0.5
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_cases"] == 6 and summary["protocol"] == protocol
