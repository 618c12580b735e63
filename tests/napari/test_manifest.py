"""The npe2 manifest is valid, registered through the ``napari.manifest`` entry point, names real callables, and
claims only what medseg reads (NIfTI, DICOM files, folders holding DICOM)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from npe2 import PluginManager, PluginManifest

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


@pytest.fixture
def medseg_only() -> PluginManager:
    """An npe2 plugin manager that knows medseg's manifest alone, so matching does not depend on other plugins."""
    manager = PluginManager()
    manager.register(PluginManifest.from_file(Path(medseg.napari.__file__).parent / "napari.yaml"))
    manager.activate("medseg")  # registers its commands, as napari does on first use
    return manager


def _offered(manager: PluginManager, path: str) -> set[str]:
    return {reader.plugin_name for reader in manager.iter_compatible_readers([path])}


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "CT.NII.GZ", "slice_0001.dcm", "IM.DCM"])
def test_reader_is_offered_what_medseg_reads(medseg_only, name):
    assert _offered(medseg_only, name) == {"medseg"}


@pytest.mark.parametrize("name", ["photo.png", "stack.tif", "stack.tiff", "array.npy", "notes.txt", "ct.mha"])
def test_reader_is_not_offered_other_files(medseg_only, name):
    assert _offered(medseg_only, name) == set()


def test_folders_reach_the_reader_which_declines_those_without_dicom(medseg_only, tmp_path):
    """npe2 offers every folder to a reader with accepts_directories (no pattern applies to folders): the hook must
    return None for a folder that holds no DICOM, so napari tries its other readers."""
    from medseg.data.dicom import write_dicom_series

    plain = tmp_path / "pngs"
    plain.mkdir()
    (plain / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    series = write_dicom_series(np.zeros((4, 3, 2), np.float32), np.eye(4), tmp_path / "series")
    for folder, readable in ((plain, False), (series, True)):
        (reader,) = medseg_only.iter_compatible_readers([str(folder)])
        hook = reader.exec(kwargs={"path": [str(folder)], "stack": False, "_registry": medseg_only.commands})
        assert (hook is not None) is readable, folder


def test_installed_plugins_leave_pngs_to_others():
    """With every installed plugin discovered (as napari does), medseg is among the readers of a .nii.gz and
    absent from those of a PNG/TIFF/NPY: no "multiple plugins" question for them because of medseg."""
    manager = PluginManager()
    manager.discover()
    assert "medseg" in _offered(manager, "ct.nii.gz")
    for name in ("photo.png", "stack.tif", "array.npy"):
        assert "medseg" not in _offered(manager, name), name
