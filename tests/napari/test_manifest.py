"""The npe2 manifest is valid, registered through the ``napari.manifest`` entry point, and names real callables."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from npe2 import PluginManifest

import medseg.napari


def test_manifest_is_registered_and_valid():
    (entry,) = [e for e in entry_points(group="napari.manifest") if e.name == "medseg"]
    assert entry.value == "medseg.napari:napari.yaml"
    manifest = PluginManifest.from_file(Path(medseg.napari.__file__).parent / "napari.yaml")
    assert manifest.name == "medseg"
    assert {w.display_name for w in manifest.contributions.widgets} == {"Interactive segmentation"}
    assert manifest.contributions.writers[0].layer_types == ["labels"]
    manifest.validate_imports()  # every python_name imports and is callable


def test_npe2_validate_cli_passes():
    npe2 = shutil.which("npe2", path=str(Path(sys.executable).parent))
    if npe2 is None:
        pytest.fail("npe2 is not installed next to this Python: install medseg with the [napari] extra.")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"}  # npe2 prints a check mark
    done = subprocess.run(
        [npe2, "validate", "medseg"], capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout
