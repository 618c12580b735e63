"""mni-slices: labels follow their written rules, the split keeps a gap, and each slice keeps its MNI position."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from medseg.data.prepare import mni_slices


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = mni_slices.build(tmp_path_factory.mktemp("mni_slices"), seed=0)
    return root, list(csv.DictReader(open(root / "classification.csv")))


def test_labels_follow_the_rules(built):
    _, rows = built
    assert len(rows) == 58 and {r["level"] for r in rows} == set(mni_slices.LEVELS)
    for row in rows:
        assert row["level"] == mni_slices.level_of(float(row["z_mm"]))
        assert int(row["ventricles"]) == int(int(row["deep_csf_voxels"]) >= 80)
    ventricular = [int(r["ventricles"]) for r in rows if r["level"] == "ventricular"]
    superior = [int(r["ventricles"]) for r in rows if float(r["z_mm"]) > 50]
    assert np.mean(ventricular) > 0.5 and sum(superior) == 0
    assert mni_slices.level_of(-20.0) == "basal" and mni_slices.level_of(-20.1) == "inferior"


def test_no_training_slice_within_4_mm_of_a_test_slice(built):
    _, rows = built
    test = np.array([float(r["z_mm"]) for r in rows if r["split"] == "test"])
    for row in rows:
        if row["split"] != "test":
            assert np.abs(test - float(row["z_mm"])).min() >= 4.0
    assert {r["split"] for r in rows} == {"train", "val", "test"} and {r["site"] for r in rows} == {"A", "B"}


def test_each_slice_is_a_one_slice_volume_at_its_mni_height(built):
    root, rows = built
    row = rows[10]
    image = nib.load(root / row["image"])
    assert image.shape == (98, 116, 1)
    assert (image.affine @ [0, 0, 0, 1])[2] == pytest.approx(float(row["z_mm"]), abs=0.06)
