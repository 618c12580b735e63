"""Atomic writes: synced before the rename, several files renamed as one step, and the leftovers of a kill cleared."""

from __future__ import annotations

import os

import pytest

from medseg.atomic import atomic_path, atomic_paths, is_orphan, remove_orphans


def test_the_content_is_synced_to_disk_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(source, target):
        calls.append(("replace", os.stat(source).st_ino))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_path(tmp_path / "a.json") as temporary:
        temporary.write_text("{}")
    written = (tmp_path / "a.json").stat().st_ino
    assert calls[:2] == [("fsync", written), ("replace", written)]  # the file's bytes are on disk before its name
    assert ("fsync", tmp_path.stat().st_ino) in calls[2:]  # then the folder, so the rename survives a power cut
    assert (tmp_path / "a.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_several_files_appear_together_in_order_or_not_at_all(tmp_path, monkeypatch):
    first, last = tmp_path / "case.npz", tmp_path / "case.nii.gz"
    order = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: order.append(os.path.basename(b)) or real_replace(a, b))
    with atomic_paths(first, last) as (a, b):
        assert a.name.endswith(".tmp.npz") and b.name.endswith(".tmp.nii.gz")  # writers see the right format
        a.write_bytes(b"probabilities")
        b.write_bytes(b"labels")
    assert order == ["case.npz", "case.nii.gz"]

    # A failure on the last rename (a kill, a full disk) takes the first file back out: neither is left.
    first.unlink(), last.unlink()

    def fail_on_label_map(a, b):
        if str(b).endswith(".nii.gz"):
            raise OSError(28, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", fail_on_label_map)
    with pytest.raises(OSError, match="No space"), atomic_paths(first, last) as (a, b):
        a.write_bytes(b"probabilities")
        b.write_bytes(b"labels")
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_removes_only_medseg_temporaries(tmp_path):
    leftovers = [
        ".CASE.nii.gz.0123456789ab.tmp.nii.gz",
        ".case.npz.a1b2c3d4e5f6.tmp.npz",
        ".run.json.00000000abcd.tmp.json",
    ]
    users = [
        "CASE.nii.gz", ".hidden_notes.txt", ".CASE.nii.gz.tmp.nii.gz", ".CASE.nii.gz.0123456789AB.tmp.nii.gz",
        ".CASE.nii.gz.0123456789ab.tmp.npz", "CASE.nii.gz.0123456789ab.tmp.nii.gz",
    ]  # fmt: skip
    for name in leftovers + users:
        (tmp_path / name).write_text("x")
    (tmp_path / ".sub.nii.gz.0123456789ab.tmp.nii.gz").mkdir()  # a folder is never a temporary file
    assert all(is_orphan(name) for name in leftovers) and not any(is_orphan(name) for name in users)
    assert remove_orphans(tmp_path) == sorted(tmp_path / name for name in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*users, ".sub.nii.gz.0123456789ab.tmp.nii.gz"])
    assert remove_orphans(tmp_path / "absent") == []
