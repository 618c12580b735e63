"""Registry lookups, the cache, and the download path (file:// archives only: nothing goes online)."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest
import yaml

from medseg.backbones.weights import sha256_file
from medseg.errors import ConfigError, WeightsError
from medseg.release.checksums import ChecksumError
from medseg.release.load import load_pretrained
from medseg.release.registry import (
    RECORD,
    fetch_release,
    find_entry,
    pack_release,
    read_registry,
    release_digest,
    repository_root,
)


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


def test_foreign_folder_under_a_registered_name_is_refused(tiny_releases, tmp_path, monkeypatch, capsys):
    from medseg.cli import main

    entry = find_entry("medseg-litemedsam-mni-tissue")
    foreign = tmp_path / "weights" / "releases" / entry.name / entry.version
    shutil.copytree(tiny_releases["merged"], foreign)  # a valid release, with valid checksums, but not this one
    monkeypatch.setenv("MEDSEG_WEIGHTS", str(tmp_path / "weights"))
    with pytest.raises(ChecksumError, match=r"is not the registered medseg-litemedsam-mni-tissue@0\.1\.0") as info:
        load_pretrained(entry.name)
    assert str(foreign) in str(info.value) and "delete that folder" in str(info.value)
    image = next((foreign / "example").glob("image_*.nii.gz"))
    code = main(["predict", "-m", entry.name, "-i", str(image), "-o", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and str(foreign) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cached_folder_release_checked_against_the_weights_hash(tiny_releases, tmp_path):
    registry = _registry(tmp_path / "registry.yaml", str(tiny_releases["merged"]),
                         sha256_file(tiny_releases["merged"] / "model.safetensors"))  # fmt: skip
    cache = tmp_path / "cache"
    shutil.copytree(tiny_releases["merged"], cache / "tiny-test" / "1.2.3")
    assert fetch_release("tiny-test", registry=registry, cache=cache) == cache / "tiny-test" / "1.2.3"  # same export
    shutil.rmtree(cache / "tiny-test" / "1.2.3")
    shutil.copytree(tiny_releases["adapter-only"], cache / "tiny-test" / "1.2.3")
    with pytest.raises(ChecksumError, match="its model.safetensors has SHA-256 .*, the registry records"):
        fetch_release("tiny-test", registry=registry, cache=cache)


def test_cached_download_is_tied_to_the_registered_archive(tiny_releases, edit_config, tmp_path):
    archive = tmp_path / "server" / "tiny-test-1.2.3.tar.gz"
    registry = _registry(tmp_path / "registry.yaml", archive.as_uri(), pack_release(tiny_releases["merged"], archive))
    cache = tmp_path / "cache"
    cached = fetch_release("tiny-test", registry=registry, cache=cache)
    assert fetch_release("tiny-test", registry=registry, cache=cache) == cached  # its own download: used again
    edit_config(cached, lambda c: c["labels"].update(liver=2, kidney=1))  # edited, checksums recomputed
    with pytest.raises(ChecksumError, match="sha256sums.txt changed since the download"):
        fetch_release("tiny-test", registry=registry, cache=cache)
    shutil.rmtree(cached)
    shutil.copytree(tiny_releases["merged"], cached)  # the same files, but placed by hand: no record of a download
    with pytest.raises(ChecksumError, match=f"lacks the {RECORD}") as info:
        fetch_release("tiny-test", registry=registry, cache=cache)
    assert str(cached) in str(info.value)
    shutil.rmtree(cached)  # what the message says to do: the registered archive is downloaded again
    assert load_pretrained("tiny-test", registry=registry, cache=cache).extras["version"] == "1.2.3"


def test_sums_sha256_pins_every_file(tiny_releases, tmp_path):
    folder = tiny_releases["merged"]
    path = tmp_path / "registry.yaml"
    entry = {"name": "tiny-test", "version": "1.2.3", "url": str(folder),
             "sha256": sha256_file(folder / "model.safetensors"), "sums_sha256": release_digest(folder)}  # fmt: skip
    path.write_text(yaml.safe_dump({"releases": [entry]}))
    cache = tmp_path / "cache"
    shutil.copytree(folder, cache / "tiny-test" / "1.2.3")
    assert fetch_release("tiny-test", registry=path, cache=cache) == cache / "tiny-test" / "1.2.3"
    path.write_text(yaml.safe_dump({"releases": [{**entry, "sums_sha256": "0" * 64}]}))
    with pytest.raises(ChecksumError, match=r"sha256sums\.txt has SHA-256 [0-9a-f]{64}, the registry records 0{64}"):
        fetch_release("tiny-test", registry=path, cache=cache)
    with pytest.raises(ChecksumError, match=r"a file of the release changed"):
        fetch_release("tiny-test", registry=path, cache=tmp_path / "empty-cache")  # the folder URL itself


def test_committed_registry_pins_the_committed_files():
    entry = find_entry("medseg-litemedsam-mni-tissue")
    assert entry.sums_sha256 == release_digest(repository_root() / entry.url)
