"""Classification tables (every label kind, subgroups, errors) and the data module (PNG 2-D, NIfTI 3-D, splits)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medseg.data.classification import read_classification_table
from medseg.data.cls_datamodule import ClassificationDataModule
from medseg.data.dicom import write_dicom_series
from medseg.data.prepare.command import run_prepare
from medseg.data.prepare.writing import write_nifti
from medseg.errors import DatasetError


def _table(root: Path, header: list[str], rows: list[list], name: str = "table.csv") -> Path:
    with open(root / name, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return root / name


@pytest.fixture
def images(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, size=(20, 30), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


def test_label_kinds(tmp_path, images):
    rows = [[f"c{i}", images[i], ["mild", "severe", "moderate"][i % 3], i % 2, (i + 1) % 2, ["F", "M", ""][i % 3]]
            for i in range(6)]  # fmt: skip
    path = _table(tmp_path, ["case_id", "image", "grade", "a", "b", "sex"], rows)
    cases, spec = read_classification_table(
        path, label_columns=["grade"], label_kind="ordinal", classes=["mild", "moderate", "severe"],
        subgroup_columns=["sex"],
    )  # fmt: skip
    assert spec.names == ("mild", "moderate", "severe") and [c.target for c in cases[:3]] == [0, 2, 1]
    assert cases[2].subgroups == {"sex": None} and cases[0].images[0] == (tmp_path / images[0]).resolve()
    _, multi = read_classification_table(path, label_columns=["grade"], label_kind="multiclass")
    assert multi.names == ("mild", "moderate", "severe")  # sorted values
    cases, spec = read_classification_table(path, label_columns=["a"], label_kind="binary")
    assert spec.names == ("no_a", "a") and [c.target for c in cases[:2]] == [0, 1]
    cases, spec = read_classification_table(path, label_columns=["a", "b"], label_kind="multilabel")
    assert spec.num_outputs == 2 and cases[1].target == [1, 0]


def test_json_tables_read_like_csv(tmp_path, images):
    rows = [{"case_id": f"c{i}", "image": images[i], "label": str(i % 2)} for i in range(4)]
    (tmp_path / "t.json").write_text(json.dumps({"cases": rows}))
    cases, _ = read_classification_table(tmp_path / "t.json", label_kind="binary")
    assert [c.target for c in cases] == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("header", "row", "kind", "message"),
    [
        (["case_id", "image"], ["c0", "im0.png"], "binary", r"no column\(s\) \['label'\]"),
        (["case_id", "image", "label"], ["c0", "missing.png", "1"], "binary", "do not exist"),
        (["case_id", "image", "label"], ["c0", "im0.png", "maybe"], "binary", "not a binary label"),
        (["case_id", "image", "label"], ["c0", "im0.png", "x"], "ordinal", "need their order"),
        (["case_id", "image", "label", "split"], ["c0", "im0.png", "1", "holdout"], "binary", "split 'holdout'"),
    ],
)
def test_table_errors_name_the_problem(tmp_path, images, header, row, kind, message):
    path = _table(tmp_path, header, [row])
    with pytest.raises(DatasetError, match=message):
        read_classification_table(path, label_kind=kind)


def test_png_datamodule_splits_budget_and_shapes(tmp_path, images):
    rows = [[f"c{i}", images[i], i % 2, "AB"[i % 2], "test" if i >= 8 else ""] for i in range(10)]
    path = _table(tmp_path, ["case_id", "image", "label", "site", "split"], rows)
    preprocess = [{"_target_": "monai.transforms.ScaleIntensityd", "keys": "image"}]
    dm = ClassificationDataModule(str(path), label_kind="binary", subgroup_columns=["site"], size=16, num_folds=4,
                                  label_fraction=0.5, preprocess=preprocess, batch_size=2)  # fmt: skip
    assert dm.test_ids == ["c8", "c9"] and len(dm.val_ids) == 2 and len(dm.train_ids) == 3  # ceil(0.5 * 6)
    assert not set(dm.train_ids) & set(dm.val_ids)
    batch = next(iter(dm.train_dataloader()))
    assert (
        batch["image"].shape == (2, 1, 16, 16) and 0 <= float(batch["image"].min()) <= float(batch["image"].max()) <= 1
    )
    assert dm.subgroups(dm.test_ids) == {"site": ["A", "B"]} and list(dm.targets(dm.test_ids)) == [0, 1]
    # the 20 x 30 PNG (MONAI reads it as 30 x 20) is padded to a square before resizing: the outer columns are zero
    image = dm.dataset_for("test")[0]["image"]
    assert float(image[0, :, :2].abs().sum()) == 0.0 and float(image[0, :, 8].abs().sum()) > 0


def test_nifti_volumes_come_out_as_size_x_size_x_slices(tmp_path):
    rows = []
    for i in range(4):
        write_nifti(
            np.random.default_rng(i).random((24, 20, 12), dtype=np.float32), np.eye(4), tmp_path / f"v{i}.nii.gz"
        )
        rows.append([f"v{i}", f"v{i}.nii.gz", i % 2, "test" if i == 3 else "val" if i == 2 else "train"])
    path = _table(tmp_path, ["case_id", "image", "label", "split"], rows)
    dm = ClassificationDataModule(str(path), label_kind="binary", spatial_dims=3, size=16, num_slices=6)
    assert (dm.train_ids, dm.val_ids, dm.test_ids) == (["v0", "v1"], ["v2"], ["v3"])
    assert dm.dataset_for("val")[0]["image"].shape == (1, 16, 16, 6)


def test_validate_lists_every_problem_of_a_classification_folder(tmp_path, capsys):
    folder = tmp_path / "Dataset993_Cls"
    write_nifti(np.zeros((4, 4, 1), np.float32), np.eye(4), folder / "images" / "a.nii.gz")
    rows = [["a", "images/a.nii.gz", "x", "train"], ["a", "images/missing.nii.gz", "y", "later"]]
    _table(folder, ["case_id", "image", "label", "split"], rows, name="classification.csv")
    assert run_prepare([str(folder)], only_check=True) == 1
    out = capsys.readouterr().out
    assert "3 problem(s)" in out and "appears twice" in out and "missing.nii.gz" in out and "'later'" in out
    _table(folder, ["case_id", "image", "label", "split"], [rows[0]], name="classification.csv")
    assert run_prepare([str(folder)], only_check=True) == 0
    assert "valid classification table: 1 cases (1 train, 0 val, 0 test); columns label" in capsys.readouterr().out


def test_dicom_files_and_series_load_as_2d_slices_and_3d_volumes(tmp_path):
    """A real single-slice CT file (pydicom's CT_small.dcm) is a 2-D case; a DICOM series folder is a 3-D case."""
    ct_small = get_testdata_file("CT_small.dcm")
    rows2d, rows3d = [], []
    for i in range(4):
        shutil.copy(ct_small, tmp_path / f"s{i}.dcm")
        rows2d.append([f"s{i}", f"s{i}.dcm", i % 2, "test" if i == 3 else "val" if i == 2 else "train"])
        volume = np.random.default_rng(i).normal(0, 100, (24, 20, 12))
        write_dicom_series(volume, np.diag([0.8, 0.8, 2.0, 1.0]), tmp_path / f"series{i}")
        rows3d.append([f"v{i}", f"series{i}", i % 2, "test" if i == 3 else "val" if i == 2 else "train"])
    ct_window = [{"_target_": "monai.transforms.ScaleIntensityRanged", "keys": "image", "a_min": -160, "a_max": 240,
                  "b_min": 0.0, "b_max": 1.0, "clip": True}]  # fmt: skip
    slices = ClassificationDataModule(str(_table(tmp_path, ["case_id", "image", "label", "split"], rows2d, "2d.csv")),
                                      label_kind="binary", size=16, preprocess=ct_window)  # fmt: skip
    image = slices.dataset_for("test")[0]["image"]
    assert image.shape == (1, 16, 16) and 0 <= float(image.min()) < float(image.max()) <= 1  # real CT contrast
    volumes = ClassificationDataModule(str(_table(tmp_path, ["case_id", "image", "label", "split"], rows3d, "3d.csv")),
                                       label_kind="binary", spatial_dims=3, size=16, num_slices=6)  # fmt: skip
    assert volumes.dataset_for("test")[0]["image"].shape == (1, 16, 16, 6)
    assert list(volumes.targets(volumes.test_ids)) == [1]
