"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

Used for everything medseg writes that another process may read (``dataset.json``, fingerprints, splits, NIfTI
outputs): the content goes to a hidden temporary name in the same folder (``.NAME.<12 hex>.tmp<SUFFIX>``, the
suffix kept so writers pick the right format), is flushed to disk (``fsync``), then ``os.replace`` renames it, which
is atomic within one file system; the folder is synced too, so the rename itself survives a power cut. On any
failure the temporary file is removed.

A process killed between writing and renaming cannot remove its temporary file. The name is distinctive enough to be
recognised later, so :func:`remove_orphans` clears such leftovers (and nothing else) from a folder before a rerun
writes into it again. :func:`atomic_paths` renames several files as one step (in order, all or none), e.g. a
prediction's probabilities and then its label map, so the last file's presence means the set is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TEMPORARY_NAME",
    "atomic_path",
    "atomic_paths",
    "atomic_write_json",
    "atomic_write_text",
    "is_orphan",
    "remove_orphans",
    "temporary_for",
]

# ".NAME.<12 hex>.tmp<SUFFIX>", SUFFIX being what temporary_for keeps of NAME (".nii.gz", the last suffix, or none).
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<id>[0-9a-f]{12})\.tmp(?P<suffix>(\.[^.]+)*)$")


def _suffix(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def temporary_for(path: Path) -> Path:
    """A fresh hidden sibling of ``path`` that :data:`TEMPORARY_NAME` recognises."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{_suffix(path.name)}"


def is_orphan(path: str | os.PathLike[str]) -> bool:
    """Whether ``path``'s name is one of medseg's temporary names (the suffix must be the one kept of NAME)."""
    match = TEMPORARY_NAME.match(Path(path).name)
    return bool(match) and match["suffix"] == _suffix(match["name"])


def remove_orphans(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in ``folder`` (not its sub-folders).

    Only regular files named exactly as :func:`atomic_path` names its temporaries are removed, so a user's own files
    (even hidden ones) are never touched. Run it before writing into a folder again, not while another process may
    be writing there.

    Returns:
        The removed files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and is_orphan(entry.name):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return sorted(removed)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # makes the rename durable; not every platform opens folders (Windows)
        _fsync(folder)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """Yield one temporary sibling per path; when the block succeeds, sync them and rename them all, in order.

    The renames happen only after every file was written and synced. Should one rename fail, the files already
    renamed by this call are removed again, so the set appears completely or not at all (an earlier version of a
    renamed file is not brought back). Put the file whose presence means "complete" last.
    """
    targets = [Path(p) for p in paths]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    temporaries = [temporary_for(t) for t in targets]
    renamed: list[Path] = []
    try:
        yield temporaries
        for temporary in temporaries:
            _fsync(temporary)
        for temporary, target in zip(temporaries, targets):
            os.replace(temporary, target)
            renamed.append(target)
        for folder in dict.fromkeys(t.parent for t in targets):
            _fsync_folder(folder)
    except BaseException:
        if len(renamed) < len(targets):
            for target in renamed:
                target.unlink(missing_ok=True)
        raise
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffixes, so writers pick the right format) to write to.

    The file is synced and renamed onto ``path`` when the block ends without an error, and deleted otherwise. Its
    mode follows the umask like any new file (``mkstemp`` would make it private).
    """
    with atomic_paths(path) as (temporary,):
        yield temporary


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], data: Any, indent: int = 2) -> Path:
    """Write ``data`` as indented JSON (with a final newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")
