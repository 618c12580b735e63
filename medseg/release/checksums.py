"""``sha256sums.txt``: one SHA-256 per file of a release, checked before anything in the release is read.

The file uses GNU coreutils' format (``<64 hex digits>  <relative path>``), so a user can also run
``sha256sum -c sha256sums.txt`` inside the release folder without medseg. A truncated download, a flipped byte or a
replaced file is refused with a message naming the file, its size and both hashes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from medseg.atomic import atomic_write_text
from medseg.backbones.weights import sha256_file
from medseg.errors import WeightsError

__all__ = ["SHA256SUMS", "ChecksumError", "ChecksumReport", "read_checksums", "verify_checksums", "write_checksums"]

SHA256SUMS = "sha256sums.txt"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class ChecksumError(WeightsError):
    """A release file is missing, or its content differs from the SHA-256 recorded in ``sha256sums.txt``."""


@dataclass
class ChecksumReport:
    """What :func:`verify_checksums` checked.

    Attributes:
        checked: relative paths whose SHA-256 matched, in the order listed.
        unlisted: files present in the folder but absent from ``sha256sums.txt`` (not trusted, never read).
    """

    checked: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)


def _release_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``folder``, hidden files and the checksum file excluded."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and path.name != SHA256SUMS:
            files.append(relative.as_posix())
    return files


def write_checksums(folder: str | Path) -> Path:
    """Hash every file under ``folder`` (except hidden files) into ``folder/sha256sums.txt``; returns its path."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / name)}  {name}" for name in _release_files(folder)]
    return atomic_write_text(folder / SHA256SUMS, "\n".join(lines) + "\n")


def read_checksums(folder: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` from ``folder/sha256sums.txt``.

    Raises:
        ChecksumError: the file is missing, a line is malformed, or a path leaves the folder.
    """
    path = Path(folder) / SHA256SUMS
    if not path.is_file():
        raise ChecksumError(
            f"{path} not found: a medseg release lists the SHA-256 of each of its files there. Re-download the "
            f"release, or re-export it with `medseg export`."
        )
    sums: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        match = _LINE.match(line.strip())
        if match is None:
            raise ChecksumError(f"{path}, line {number}: expected '<sha256>  <file>', got {line[:80]!r}.")
        name = match.group(2)
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts:
            raise ChecksumError(f"{path}, line {number}: {name!r} is not a path inside the release folder.")
        sums[name] = match.group(1)
    if not sums:
        raise ChecksumError(f"{path} lists no files; re-export the release with `medseg export`.")
    return sums


def verify_checksums(folder: str | Path, required: tuple[str, ...] = ()) -> ChecksumReport:
    """Check every file listed in ``sha256sums.txt`` against its SHA-256.

    Args:
        folder: the release folder.
        required: files that must be listed (e.g. ``model.safetensors``, ``config.yaml``): a release that omits one
            from its checksums is refused rather than read unchecked.

    Returns:
        The :class:`ChecksumReport` (files checked, unlisted files found).

    Raises:
        ChecksumError: a listed file is missing or differs from its recorded hash, or a required file is unlisted.
    """
    folder = Path(folder)
    sums = read_checksums(folder)
    unlisted_required = [name for name in required if name not in sums]
    if unlisted_required:
        raise ChecksumError(
            f"{folder / SHA256SUMS} does not list {unlisted_required}; files without a checksum are not loaded. "
            f"Re-export the release with `medseg export`."
        )
    report = ChecksumReport()
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise ChecksumError(f"{path} is listed in {SHA256SUMS} but missing: the release is incomplete.")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(
                f"Checksum mismatch for {path} ({path.stat().st_size} bytes): SHA-256 {actual}, expected {expected} "
                f"from {SHA256SUMS}. The file is truncated, corrupted or modified; download the release again."
            )
        report.checked.append(name)
    report.unlisted = [name for name in _release_files(folder) if name not in sums]
    return report
