"""Loading and verifying refuse damaged releases with errors that name the file and what is wrong."""

from __future__ import annotations

import json

import pytest

import medseg
from medseg.errors import ConfigError, WeightsError
from medseg.release.checksums import ChecksumError
from medseg.release.load import load_release
from medseg.release.verify import run_verify, verify_release


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mode", ["adapter-only", "merged"])
def test_flipped_byte_fails_load_and_verify(release_copy, base_weights_env, mode, capsys):
    folder = release_copy(mode)
    _flip_byte(folder / "model.safetensors")
    with pytest.raises(ChecksumError, match=r"Checksum mismatch for .*model\.safetensors"):
        load_release(folder)
    report = verify_release(folder)
    assert not report.passed and [c.name for c in report.checks] == ["checksums"]
    assert "model.safetensors" in report.checks[0].detail
    assert run_verify(folder, device="cpu") == 1
    assert "[FAIL] checksums" in capsys.readouterr().out


def test_truncated_file_refused(release_copy, base_weights_env):
    folder = release_copy()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(ChecksumError, match="truncated"):
        medseg.load_pretrained(folder)


def test_missing_base_weights_are_named(release_copy, edit_config, tmp_path, monkeypatch):
    folder = release_copy("adapter-only")
    monkeypatch.setenv("MEDSEG_WEIGHTS", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match=r"Missing base weights 'tiny_mae\.safetensors' \(backbone mae_vit_base"):
        load_release(folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["weights"]["base"]["file"] = "mae_pretrain_vit_base.pth"  # config and metadata agree: rebuild is reached
    (folder / "metadata.json").write_text(json.dumps(metadata))
    edit_config(folder, lambda c: c["weights"]["base"].update(file="mae_pretrain_vit_base.pth"))
    report = verify_release(folder)
    assert [(c.name, c.passed) for c in report.checks] == [("checksums", True), ("metadata", True), ("rebuild", False)]
    assert "mae_pretrain_vit_base.pth" in report.checks[2].detail
    assert "dl.fbaipublicfiles.com" in report.checks[2].detail  # where to get the official file


def test_base_weights_with_another_hash_refused(release_copy, base_weights_env):
    folder = release_copy("adapter-only")
    _flip_byte(base_weights_env / "tiny_mae.safetensors", offset=-8)
    try:
        with pytest.raises(WeightsError, match="Wrong files: .*tiny_mae.safetensors has SHA-256"):
            load_release(folder)
    finally:
        _flip_byte(base_weights_env / "tiny_mae.safetensors", offset=-8)
    assert load_release(folder).kind == "dense"  # restored: loads again


def test_release_config_cannot_call_arbitrary_code(release_copy, edit_config):
    folder = release_copy("merged")
    edit_config(folder, lambda c: c["model"].update(_target_="os.system"))
    with pytest.raises(ConfigError, match=r"config\.model\._target_ = 'os.system' is not allowed"):
        load_release(folder)


def test_unlisted_file_fails_verify_but_not_load(release_copy):
    folder = release_copy("merged")
    (folder / "notes.txt").write_text("added later")
    report = verify_release(folder)
    assert not report.passed and "notes.txt" in report.checks[0].detail
    assert load_release(folder).extras["mode"] == "merged"


def test_predict_cli_with_release_folder(tiny_releases, tmp_path):
    import nibabel as nib
    import numpy as np

    from medseg.cli import main
    from medseg.release.example import read_example

    folder = tiny_releases["merged"]
    example = read_example(folder)
    code = main(["predict", "-m", str(folder), "-i", str(folder / example["inputs"][0]), "-o", str(tmp_path),
                 "--device", "cpu", "--no-progress"])  # fmt: skip
    assert code == 0
    written = sorted(tmp_path.glob("*.nii.gz"))
    assert len(written) == 1
    expected = nib.load(str(folder / example["expected"]))
    predicted = nib.load(str(written[0]))
    assert np.allclose(predicted.affine, expected.affine)
    assert np.array_equal(np.asarray(predicted.dataobj), np.asarray(expected.dataobj))
