"""Registry lookups, the cache, and the download path (file:// archives only: nothing goes online)."""

from __future__ import annotations

import io
import tarfile

import pytest
import yaml

from medseg.backbones.weights import sha256_file
from medseg.errors import ConfigError, WeightsError
from medseg.release.checksums import ChecksumError
from medseg.release.load import load_pretrained
from medseg.release.registry import fetch_release, find_entry, pack_release, read_registry, repository_root


def _registry(path, url, sha256, version="1.2.3", name="tiny-test"):
    entries = [{"name": name, "version": version, "url": url, "sha256": sha256}]
    path.write_text(yaml.safe_dump({"releases": entries}))
    return path


def test_download_unpack_cache_and_load(tiny_releases, tmp_path):
    archive = tmp_path / "server" / "tiny-test-1.2.3.tar.gz"
    digest = pack_release(tiny_releases["merged"], archive)
    assert digest == sha256_file(archive)
    registry = _registry(tmp_path / "registry.yaml", archive.as_uri(), digest)
    cache = tmp_path / "cache"
    loaded = load_pretrained("tiny-test", registry=registry, cache=cache)
    assert loaded.extras["release_dir"] == str((cache / "tiny-test" / "1.2.3").resolve())
    assert loaded.extras["version"] == "1.2.3"
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-test"]  # no temporary archive or staging folder left
    archive.unlink()  # the cache is used first: no download needed any more
    assert fetch_release("tiny-test@1.2.3", registry=registry, cache=cache) == cache / "tiny-test" / "1.2.3"


def test_download_with_wrong_hash_leaves_nothing(tiny_releases, tmp_path):
    archive = tmp_path / "tiny.tar.gz"
    pack_release(tiny_releases["merged"], archive)
    registry = _registry(tmp_path / "registry.yaml", archive.as_uri(), "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="the registry records 0000"):
        fetch_release("tiny-test", registry=registry, cache=cache)
    assert list(cache.iterdir()) == []


def test_unreachable_url_and_unknown_name(tmp_path):
    registry = _registry(tmp_path / "registry.yaml", (tmp_path / "absent.tar.gz").as_uri(), "0" * 64)
    with pytest.raises(WeightsError, match="Cannot download"):
        fetch_release("tiny-test", registry=registry, cache=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"registered: tiny-test@1\.2\.3"):
        find_entry("other-model", registry)


def test_archive_escaping_the_folder_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 4
        handle.addfile(info, io.BytesIO(b"evil"))
    registry = _registry(tmp_path / "registry.yaml", archive.as_uri(), sha256_file(archive))
    with pytest.raises(WeightsError, match="outside the release folder"):
        fetch_release("tiny-test", registry=registry, cache=tmp_path / "cache")
    assert not (tmp_path / "escaped.txt").exists()


def test_highest_version_wins(tmp_path):
    path = tmp_path / "registry.yaml"
    entries = [
        {"name": "m", "version": v, "url": f"releases/m-{v}", "sha256": "0" * 64} for v in ("0.9.0", "0.10.0", "0.2.1")
    ]
    path.write_text(yaml.safe_dump({"releases": entries}))
    assert find_entry("m", path).version == "0.10.0"
    assert find_entry("m@0.2.1", path).url == "releases/m-0.2.1"


def test_committed_registry_points_at_the_committed_release():
    entry = find_entry("medseg-litemedsam-mni-tissue")
    assert entry in read_registry() and not entry.is_archive
    folder = repository_root() / entry.url
    assert sha256_file(folder / "model.safetensors") == entry.sha256
    assert fetch_release(entry.name, cache=repository_root() / "no-such-cache") == folder
