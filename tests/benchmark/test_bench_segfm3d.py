"""The SegFM3D table tool (``tools/bench_segfm3d.py``): its pure parts on small real inputs (LiteMedSAM's intensity
step as a run transform, the record built from a real protocol section, merging and the table) and its refusals.
The model evaluations themselves are the protocol's code, tested in ``tests/evaluation/test_segfm3d*.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import ConfigError
from medseg.evaluation.segfm3d import Segfm3dSettings, run_case, summarize_segfm3d
from medseg.inference.recipe import SliceRecipe

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_segfm3d.py"


@pytest.fixture(scope="module")
def tool():
    """``tools/bench_segfm3d.py`` loaded as a module (tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_segfm3d", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ct_recipe_maps_the_soft_tissue_window_to_unit_range(tool):
    recipe, described = tool.recipe_for({0: "CT"})
    assert recipe.intensity == "ct" and "window" in described
    image = torch.tensor([-1000.0, -160.0, 40.0, 240.0, 900.0]).reshape(1, 5, 1, 1)
    out = tool.RecipeIntensity(recipe)({"image": image, "label": "kept"})
    np.testing.assert_allclose(np.asarray(out["image"]).ravel(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert out["label"] == "kept"


def test_mr_recipe_uses_percentiles_of_the_positive_voxels(tool):
    recipe, described = tool.recipe_for({0: "T1"})
    assert recipe.intensity == "mr" and described.startswith("T1:")
    values = np.concatenate([np.zeros(500), np.arange(1.0, 1001.0)]).astype(np.float32)
    out = np.asarray(tool.RecipeIntensity(recipe)({"image": values.reshape(1, 1500, 1, 1)})["image"]).ravel()
    lo, hi = np.percentile(values[values > 0], [0.5, 99.5])  # zeros left out, as MedSAM's MR rule does
    np.testing.assert_allclose(out, np.clip((values - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert out[:500].max() == 0.0 and out.max() == 1.0


def test_recipe_refuses_several_channels_and_the_none_recipe(tool):
    with pytest.raises(ConfigError, match="one channel"):
        tool.recipe_for({0: "T1", 1: "T2"})
    with pytest.raises(ConfigError, match="'ct' or 'mr'"):
        tool.RecipeIntensity(SliceRecipe("none"))


class _Fixed:
    """An object session that always answers the same mask (the reference: perfect; zeros: nothing found)."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask

    def box(self, box):
        return self.mask.copy()

    def click(self, clicks):
        return self.mask.copy()


def _section() -> dict:
    reference = np.zeros((12, 12, 6), dtype=np.int64)
    reference[3:9, 3:9, 1:5] = 1
    settings = Segfm3dSettings()
    perfect, _ = run_case({"a": _Fixed(reference == 1)}, reference, {"a": 1}, (1.0, 1.0, 1.0), settings)
    empty, _ = run_case({"a": _Fixed(np.zeros_like(reference, bool))}, reference, {"a": 1}, (1.0, 1.0, 1.0), settings)
    cases = {"good": perfect, "bad": empty, "healthy": {"classes": [], "skipped": "no foreground class"}}
    return summarize_segfm3d(cases, settings)


def test_record_holds_the_means_curves_and_scored_cases_of_a_real_section(tool):
    record = tool.record_from_section(_section())
    assert record["n_cases"] == 2 and record["n_skipped"] == 1 and record["n_failed"] == 0
    assert record["dsc_auc"] == pytest.approx(2.0)  # (4 + 0) / 2: the AUC over 5 click steps of DSC 1 and of DSC 0
    assert record["final_dsc"] == pytest.approx(0.5) and record["final_nsd"] == pytest.approx(0.5)
    assert record["dsc_per_step"] == pytest.approx([0.5] * 6) and len(record["nsd_per_step"]) == 6
    assert set(record["per_case"]) == {"good", "bad"}
    good = record["per_case"]["good"]
    assert good["dsc_auc"] == pytest.approx(4.0) and good["classes"] == ["a"]
    assert record["seconds_per_step"] >= 0.0


def test_record_refuses_another_protocol_and_an_unscored_section(tool):
    with pytest.raises(ConfigError, match="segfm3d"):
        tool.record_from_section({"name": "dice_at_k"})
    unscored = summarize_segfm3d({"healthy": {"classes": []}}, Segfm3dSettings())
    with pytest.raises(ConfigError, match="no case"):
        tool.record_from_section(unscored)


def test_merge_replaces_the_same_model_and_dataset_in_place_and_appends_new_ones(tool):
    old = [{"model": "m", "dataset": "A", "v": 1}, {"model": "m", "dataset": "B", "v": 2}]
    new = [{"model": "m", "dataset": "A", "v": 3}, {"model": "n", "dataset": "A", "v": 4}]
    merged = tool.merge_records(old, new)
    assert [(r["model"], r["dataset"], r["v"]) for r in merged] == [("m", "A", 3), ("m", "B", 2), ("n", "A", 4)]


def test_table_has_one_row_per_record_with_its_numbers(tool):
    record = {"model": "litemedsam", "dataset": "Dataset990_Synthetic", **tool.record_from_section(_section())}
    lines = tool.table([record, {**record, "dataset": "Dataset991_MNITissue"}]).splitlines()
    assert len(lines) == 4 and lines[1].startswith("|---|")
    assert lines[2].startswith("| litemedsam | Dataset990_Synthetic | 2 | 2.000 |")
    assert "0.50 0.50 0.50 0.50 0.50 0.50" in lines[2] and "Dataset991_MNITissue" in lines[3]


def test_bad_arguments_are_one_line_errors_and_write_nothing(tool, tmp_path, capsys):
    output = tmp_path / "out.json"
    with pytest.raises(SystemExit) as stop:
        tool.main(["--output", str(output)])
    assert stop.value.code == 2 and "--dataset DIR" in capsys.readouterr().err
    assert tool.main(["--dataset", str(tmp_path / "nowhere"), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_segfm3d.py: error: --dataset") and err.count("\n") == 1
    assert tool.main(["--run", str(tmp_path), "--output", str(output)]) == 2
    assert "medseg train" in capsys.readouterr().err and not output.exists()


def test_a_failing_model_becomes_an_error_record_and_a_failed_row(tool, capsys):
    def broken():
        raise ConfigError("no weights\n here")

    record = tool._measure("tinysam2", "Dataset990_Synthetic", broken)
    assert record == {"model": "tinysam2", "dataset": "Dataset990_Synthetic", "error": "ConfigError: no weights here"}
    assert capsys.readouterr().err == "bench_segfm3d.py: error: tinysam2 on Dataset990_Synthetic: no weights here\n"
    assert tool.table([record]).splitlines()[2].startswith("| tinysam2 | Dataset990_Synthetic | failed: ConfigError")
    assert tool._measure("m", "d", lambda: {"model": "m"})["wall_s"] >= 0.0
