"""Published releases by name: ``registry.yaml``, the local cache, and download with SHA-256 check.

``medseg/release/registry.yaml`` lists each release's ``name``, ``version``, ``url`` and ``sha256``. The URL is one of

- a folder path relative to the repository root (``releases/NAME``): releases committed to the repository, usable
  offline from a clone; ``sha256`` is that of the folder's ``model.safetensors``;
- ``file://`` or ``https://`` to a ``.tar.gz``/``.tgz``/``.zip`` archive of a release folder (:func:`pack_release`
  writes one); ``sha256`` is that of the archive.

An entry may also give ``sums_sha256``, the SHA-256 of the release's ``sha256sums.txt`` (:func:`release_digest`):
since loading checks every file against that list, it pins the whole release, not only its weights.

:func:`fetch_release` looks in the cache first (``$MEDSEG_WEIGHTS/releases/NAME/VERSION`` when ``MEDSEG_WEIGHTS`` is
set, else ``~/.cache/medseg/releases/NAME/VERSION``), then uses the URL: an archive is downloaded with ``urllib``,
its SHA-256 checked, unpacked into a hidden temporary folder and renamed into place, so an interrupted download never
leaves a half-written release in the cache. A cached folder is used under the registered name only if it matches the
registry: its ``sha256sums.txt`` has the entry's ``sums_sha256``, or (for a folder URL) its ``model.safetensors`` the
entry's ``sha256``, or it carries the record (:data:`RECORD`) of the download whose archive had the entry's
``sha256``. A folder put there by hand, or changed since, is refused with the folder named: delete it to download
the release again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from medseg.backbones.weights import sha256_file
from medseg.errors import ConfigError, WeightsError
from medseg.paths import ENV_WEIGHTS
from medseg.release.checksums import SHA256SUMS, ChecksumError

__all__ = [
    "RECORD",
    "REGISTRY_FILE",
    "RegistryEntry",
    "cache_root",
    "fetch_release",
    "find_entry",
    "pack_release",
    "read_registry",
    "release_digest",
    "repository_root",
]

REGISTRY_FILE = Path(__file__).with_name("registry.yaml")
_ARCHIVES = (".tar.gz", ".tgz", ".zip")
#: Hidden file written into a cached release after its download matched the registry (checksums ignore it).
RECORD = ".medseg-registry.json"


@dataclass(frozen=True)
class RegistryEntry:
    """One published release (see the module docstring for ``url`` and ``sha256``)."""

    name: str
    version: str
    url: str
    sha256: str
    description: str = ""
    sums_sha256: str = ""

    @property
    def is_archive(self) -> bool:
        """Whether ``url`` points at an archive to download and unpack (else at a release folder)."""
        return urllib.parse.urlparse(self.url).path.lower().endswith(_ARCHIVES)


def repository_root() -> Path:
    """The folder that holds the ``medseg`` package (a clone's root): relative registry URLs start there."""
    return Path(__file__).resolve().parents[2]


def cache_root() -> Path:
    """``$MEDSEG_WEIGHTS/releases`` when ``MEDSEG_WEIGHTS`` is set, else ``~/.cache/medseg/releases``."""
    base = os.environ.get(ENV_WEIGHTS)
    return (Path(base) if base else Path.home() / ".cache" / "medseg").expanduser().resolve() / "releases"


def _version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError as err:
        raise ConfigError(f"release version {version!r} is not semantic (X.Y.Z).") from err


def read_registry(path: str | Path | None = None) -> list[RegistryEntry]:
    """The entries of a registry file (default :data:`REGISTRY_FILE`).

    Raises:
        ConfigError: the file is missing or an entry lacks ``name``, ``version``, ``url`` or ``sha256``.
    """
    path = Path(path) if path is not None else REGISTRY_FILE
    if not path.is_file():
        raise ConfigError(f"release registry {path} not found.")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    entries = []
    for index, item in enumerate(data.get("releases") or []):
        missing = [k for k in ("name", "version", "url", "sha256") if not item.get(k)]
        if missing:
            raise ConfigError(f"{path}: releases[{index}] lacks {missing}.")
        _version_key(str(item["version"]))
        entries.append(
            RegistryEntry(
                name=str(item["name"]),
                version=str(item["version"]),
                url=str(item["url"]),
                sha256=str(item["sha256"]).lower(),
                description=str(item.get("description", "")),
                sums_sha256=str(item.get("sums_sha256") or "").lower(),
            )
        )
    return entries


def find_entry(name: str, registry: str | Path | None = None) -> RegistryEntry:
    """The entry of ``NAME`` (its highest version) or ``NAME@VERSION``.

    Raises:
        ConfigError: no such release; the message lists the registered ones.
    """
    wanted, _, version = name.partition("@")
    entries = read_registry(registry)
    matches = [e for e in entries if e.name == wanted and (not version or e.version == version)]
    if not matches:
        known = ", ".join(f"{e.name}@{e.version}" for e in entries) or "none"
        raise ConfigError(
            f"{name!r} is neither a release folder nor a registered release (registered: {known}). Give the path of "
            f"a folder written by `medseg export`, or a registered name."
        )
    return max(matches, key=lambda e: _version_key(e.version))


def _sha256_of(path: Path) -> str:
    return sha256_file(path)


def release_digest(folder: str | Path) -> str:
    """SHA-256 of ``folder/sha256sums.txt``: one hash that pins every file of a release (``sums_sha256``)."""
    return _sha256_of(Path(folder) / SHA256SUMS)


def _stale(cached: Path, entry: RegistryEntry, why: str) -> ChecksumError:
    return ChecksumError(
        f"The cached release {cached} is not the registered {entry.name}@{entry.version}: {why}. It was put there by "
        f"hand or changed since medseg downloaded it; delete that folder (medseg then downloads the registered "
        f"release again), or load it by its path if you trust it."
    )


def _check_cached(cached: Path, entry: RegistryEntry) -> Path:
    """``cached`` if it matches ``entry`` (see the module docstring), else a :class:`ChecksumError` naming it."""
    if not (cached / SHA256SUMS).is_file():
        raise _stale(cached, entry, f"it has no {SHA256SUMS}")
    sums, registered = release_digest(cached), "the registry records"
    if entry.sums_sha256:
        if sums != entry.sums_sha256:
            raise _stale(cached, entry, f"its {SHA256SUMS} has SHA-256 {sums}, {registered} {entry.sums_sha256}")
        return cached
    if not entry.is_archive:
        weights = cached / "model.safetensors"
        actual = _sha256_of(weights) if weights.is_file() else "none (no model.safetensors)"
        if actual != entry.sha256:
            raise _stale(cached, entry, f"its model.safetensors has SHA-256 {actual}, {registered} {entry.sha256}")
        return cached
    try:
        record = json.loads((cached / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise _stale(cached, entry, f"it lacks the {RECORD} medseg writes after a verified download") from None
    if not isinstance(record, dict) or record.get("archive_sha256") != entry.sha256:
        raise _stale(cached, entry, f"it came from another archive than the registered one (SHA-256 {entry.sha256})")
    if record.get("sums_sha256") != sums:
        raise _stale(cached, entry, f"its {SHA256SUMS} changed since the download")
    return cached


def _local_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    path = Path(url).expanduser()
    return path if path.is_absolute() else repository_root() / path


def _folder_release(entry: RegistryEntry) -> Path:
    folder = _local_path(entry.url)
    if not (folder / SHA256SUMS).is_file():
        raise WeightsError(
            f"Release {entry.name}@{entry.version} is registered at {entry.url}, i.e. {folder}, which is not a release "
            f"folder here: committed releases live in a clone of the medseg repository (releases/). Clone it, or put "
            f"the release folder in {cache_root() / entry.name / entry.version}."
        )
    actual = _sha256_of(folder / "model.safetensors")
    if actual != entry.sha256:
        raise ChecksumError(
            f"{folder / 'model.safetensors'} has SHA-256 {actual}, but the registry ({REGISTRY_FILE.name}) records "
            f"{entry.sha256} for {entry.name}@{entry.version}: the folder holds another export. Restore it from git."
        )
    if entry.sums_sha256 and release_digest(folder) != entry.sums_sha256:
        raise ChecksumError(
            f"{folder / SHA256SUMS} has SHA-256 {release_digest(folder)}, but the registry ({REGISTRY_FILE.name}) "
            f"records {entry.sums_sha256} for {entry.name}@{entry.version}: a file of the release changed. Restore it "
            f"from git."
        )
    return folder


def _download(url: str, target: Path, timeout_s: float = 60.0) -> str:
    """Copy ``url`` to ``target`` in 1 MiB chunks; returns the SHA-256 of what was written."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(target, "wb") as out:
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
    except (urllib.error.URLError, OSError) as err:
        raise WeightsError(f"Cannot download {url}: {err}. Check the connection, or fetch the archive yourself.") from (
            err
        )
    return digest.hexdigest()


def _safe_members(names: list[str], archive: Path) -> None:
    for name in names:
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts:
            raise WeightsError(f"{archive} holds {name!r}, a path outside the release folder; refusing to unpack it.")


def _unpack(archive: Path, destination: Path) -> None:
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as handle:
            _safe_members(handle.namelist(), archive)
            handle.extractall(destination)
        return
    with tarfile.open(archive, "r:*") as handle:
        members = handle.getmembers()
        _safe_members([m.name for m in members], archive)
        odd = [m.name for m in members if not (m.isfile() or m.isdir())]
        if odd:
            raise WeightsError(f"{archive} holds links or special files {odd[:5]}; a release has plain files only.")
        if hasattr(tarfile, "data_filter"):
            handle.extractall(destination, filter="data")
        else:  # pragma: no cover - Python < 3.10.12
            handle.extractall(destination)


def _release_root(folder: Path, entry: RegistryEntry) -> Path:
    if (folder / SHA256SUMS).is_file():
        return folder
    children = [p for p in folder.iterdir() if p.is_dir()]
    if len(children) == 1 and (children[0] / SHA256SUMS).is_file():
        return children[0]
    raise WeightsError(f"The archive of {entry.name}@{entry.version} ({entry.url}) holds no release folder.")


def fetch_release(name: str, registry: str | Path | None = None, cache: str | Path | None = None) -> Path:
    """The folder of a registered release, from the cache, the repository, or downloaded (see the module docstring).

    Args:
        name: ``NAME`` or ``NAME@VERSION``.
        registry: registry file (default :data:`REGISTRY_FILE`).
        cache: cache folder (default :func:`cache_root`).

    Raises:
        ConfigError: unknown name.
        WeightsError: the URL cannot be reached, the archive is malformed, or a folder URL does not exist here.
        ChecksumError: the download's (or folder's) SHA-256 differs from the registry's, or the cached folder does
            not match the registry (put there by hand or changed): the message names it and says to delete it.
    """
    entry = find_entry(name, registry)
    cache = Path(cache) if cache is not None else cache_root()
    cached = cache / entry.name / entry.version
    if cached.exists() and (not cached.is_dir() or any(cached.iterdir())):
        return _check_cached(cached, entry)
    if not entry.is_archive:
        return _folder_release(entry)
    cache.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    suffix = next(s for s in _ARCHIVES if urllib.parse.urlparse(entry.url).path.lower().endswith(s))
    archive = cache / f".{entry.name}-{entry.version}.{token}{suffix}"
    staging = cache / f".{entry.name}-{entry.version}.{token}.unpack"
    try:
        actual = _download(entry.url, archive)
        if actual != entry.sha256:
            raise ChecksumError(
                f"{entry.url} has SHA-256 {actual}, but the registry records {entry.sha256} for "
                f"{entry.name}@{entry.version}: the download is incomplete or the file was replaced. Try again."
            )
        staging.mkdir()
        _unpack(archive, staging)
        root = _release_root(staging, entry)
        record = {"name": entry.name, "version": entry.version, "url": entry.url, "archive_sha256": actual}
        (root / RECORD).write_text(json.dumps({**record, "sums_sha256": release_digest(root)}), encoding="utf-8")
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(root, cached)
        except OSError:
            if not (cached / SHA256SUMS).is_file():  # another process won the race with a complete copy otherwise
                raise
            return _check_cached(cached, entry)
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    return cached


def pack_release(folder: str | Path, archive: str | Path) -> str:
    """Write ``folder`` as a ``.tar.gz`` archive (one top-level folder) for a registry URL; returns its SHA-256."""
    folder, archive = Path(folder), Path(archive)
    if not (folder / SHA256SUMS).is_file():
        raise ConfigError(f"{folder} is not a release folder (no {SHA256SUMS}); export it with `medseg export`.")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts):
                handle.add(path, arcname=f"{folder.name}/{path.relative_to(folder).as_posix()}", recursive=False)
    return _sha256_of(archive)
