"""``medseg prepare`` into a destination it cannot write: one line naming the folder, before any work, nothing left."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from medseg.cli import main


def _can_write(folder: Path) -> bool:
    try:
        shutil.rmtree(tempfile.mkdtemp(dir=folder))
    except OSError:
        return False
    return True


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot write: a 0o555 folder, or for root (who ignores modes) the read-only sysfs."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        found = next((f for f in (folder, Path("/sys/kernel")) if f.is_dir() and not _can_write(f)), None)
        assert found is not None, "no unwritable folder on this machine"
        yield found
    finally:
        folder.chmod(0o755)


def _one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("medseg prepare: error:") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def test_prepare_into_a_read_only_data_folder_is_one_line(unwritable_folder, monkeypatch, capsys):
    before = sorted(p.name for p in unwritable_folder.iterdir())
    monkeypatch.setenv("MEDSEG_DATA", str(unwritable_folder))
    assert main(["prepare", "synthetic"]) == 2
    _one_line_error(capsys, str(unwritable_folder), "$MEDSEG_DATA", "cannot be written", "--output")
    assert sorted(p.name for p in unwritable_folder.iterdir()) == before


def test_prepare_into_a_new_folder_under_a_read_only_one_is_one_line(unwritable_folder, monkeypatch, capsys):
    monkeypatch.setenv("MEDSEG_DATA", str(unwritable_folder / "data"))
    assert main(["prepare", "synthetic"]) == 2
    _one_line_error(capsys, str(unwritable_folder / "data"), "cannot be written")
    assert not (unwritable_folder / "data").exists()


def test_prepare_into_a_file_is_one_line_and_the_file_is_untouched(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.write_text("my notes\n")
    monkeypatch.setenv("MEDSEG_DATA", str(data))
    assert main(["prepare", "synthetic"]) == 2
    _one_line_error(capsys, str(data), "is not a folder")
    assert main(["prepare", "synthetic", "--output", str(data / "sub")]) == 2
    _one_line_error(capsys, "--output", f"{data} is a file")
    assert data.read_text() == "my notes\n"
