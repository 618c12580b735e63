"""sha256sums.txt: GNU format, every file, refusal of paths outside the folder and of malformed lines."""

from __future__ import annotations

import hashlib

import pytest

from medseg.release.checksums import ChecksumError, read_checksums, verify_checksums, write_checksums


def test_write_and_verify(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden").write_text("ignored")
    write_checksums(tmp_path)
    sums = read_checksums(tmp_path)
    assert sums == {
        "a.txt": hashlib.sha256(b"alpha").hexdigest(),
        "sub/b.bin": hashlib.sha256(b"\x00\x01").hexdigest(),
    }
    assert verify_checksums(tmp_path, required=("a.txt",)).checked == ["a.txt", "sub/b.bin"]
    with pytest.raises(ChecksumError, match="does not list"):
        verify_checksums(tmp_path, required=("model.safetensors",))
    (tmp_path / "sub" / "b.bin").unlink()
    with pytest.raises(ChecksumError, match="missing"):
        verify_checksums(tmp_path)


@pytest.mark.parametrize(
    "line, message",
    [("0" * 64 + "  ../outside.txt", "not a path inside"), ("abc  file.txt", "expected '<sha256>  <file>'")],
)
def test_bad_lines_refused(tmp_path, line, message):
    (tmp_path / "sha256sums.txt").write_text(line + "\n")
    with pytest.raises(ChecksumError, match=message):
        read_checksums(tmp_path)


def test_missing_checksum_file(tmp_path):
    with pytest.raises(ChecksumError, match="sha256sums.txt not found"):
        verify_checksums(tmp_path)
