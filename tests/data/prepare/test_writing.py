"""building_dataset: a failed write is one line and leaves no partial dataset, and never loses the old one."""

from __future__ import annotations

import errno
import os

import pytest

from medseg.data.prepare.writing import building_dataset
from medseg.errors import DatasetError


def test_a_full_disk_during_a_build_is_one_line_and_leaves_nothing(tmp_path):
    final = tmp_path / "Dataset990_Synthetic"
    full = r"building .*Dataset990_Synthetic failed \(No space left on device"
    with pytest.raises(DatasetError, match=full), building_dataset(final) as work:
        (work / "dataset.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(work / "imagesTr" / "case_0000.nii.gz"))
    assert list(tmp_path.iterdir()) == []


def test_the_old_dataset_is_kept_when_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    final = tmp_path / "Dataset990_Synthetic"
    final.mkdir()
    (final / "dataset.json").write_text('{"old": true}')
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new dataset moving into place
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(DatasetError, match="old dataset kept"), building_dataset(final, force=True) as work:
        (work / "dataset.json").write_text('{"new": true}')
    assert (final / "dataset.json").read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
