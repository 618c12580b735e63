"""Data and results folders: messages that name the variable to change and the command that fixes it."""

from __future__ import annotations

import os

import pytest

from medseg.errors import ConfigError, DatasetError
from medseg.paths import check_output_folder, find_dataset


@pytest.mark.parametrize("name", ["mni-slices", "synthetic", "mni-tissue"])
def test_a_missing_demo_dataset_names_its_prepare_command(name, tmp_path):
    with pytest.raises(DatasetError, match=f"build it with `medseg prepare {name}`"):
        find_dataset(name, tmp_path)  # the data folder exists but is empty
    with pytest.raises(DatasetError, match=f"build it with `medseg prepare {name}`"):
        find_dataset(name, tmp_path / "missing")


def test_an_unknown_dataset_lists_every_demo_dataset(tmp_path):
    with pytest.raises(DatasetError) as error:
        find_dataset("Dataset555_Nope", tmp_path)
    assert "`medseg prepare mni-slices`" in str(error.value) and "`medseg prepare synthetic`" in str(error.value)


def test_an_unusable_results_folder_names_the_variable(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setenv("MEDSEG_RESULTS", str(results))
    assert check_output_folder(results / "synthetic" / "run" / "fold_0") == results / "synthetic" / "run" / "fold_0"
    assert not results.exists()  # checked, not created

    results.write_text("not a folder")
    with pytest.raises(ConfigError) as error:
        check_output_folder(results / "synthetic" / "run")
    message = str(error.value)
    assert f"{results} is a file" in message and "`export MEDSEG_RESULTS=$HOME/medseg-results`" in message

    results.unlink()
    results.mkdir()
    denied = os.access  # a read-only folder, as os.access reports it (chmod would not stop root, who runs CI here)
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(results) else denied(p, mode))
    with pytest.raises(ConfigError, match=rf"{results} is not writable, .* in MEDSEG_RESULTS \(\$MEDSEG_RESULTS="):
        check_output_folder(results / "synthetic" / "run")
    with pytest.raises(ConfigError, match="is not writable, .* in the output folder: choose a writable folder"):
        monkeypatch.delenv("MEDSEG_RESULTS")
        check_output_folder(results / "x")
