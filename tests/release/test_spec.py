"""A release's config.yaml cannot run code: exact targets, no resolvers, safe YAML (the payloads of issue 15).

Each payload is put into a copy of a real release whose checksums are then recomputed, as anyone who edits a release
can do; loading, `medseg verify` and `medseg predict -m RELEASE` must refuse it in one line before anything in it runs.
"""

from __future__ import annotations

import pytest
import torch
from hydra._internal.utils import _locate

from medseg.cli import main
from medseg.errors import ConfigError
from medseg.release.checksums import write_checksums
from medseg.release.load import load_release
from medseg.release.spec import ALLOWED_TARGETS, read_release_config


class _WritesMarker:
    """Pickled, it makes the unpickler call ``open(marker, "w")``: a file that appears only if the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _touch(marker) -> list[str]:
    return [f"touch {marker}"]


# (id, transform appended to data.preprocess.transforms, what the one-line error must name)
PAYLOADS = [
    ("torch.load", lambda m, f: {"_target_": "medseg.data.transforms.torch.load", "f": str(f / "evil.pt"),
                                 "weights_only": False}, "medseg.data.transforms.torch.load"),
    ("os.system", lambda m, f: {"_target_": "medseg.data.transforms.torch.os.system", "_args_": _touch(m)},
     "medseg.data.transforms.torch.os.system"),
    ("monai-os.system", lambda m, f: {"_target_": "monai.transforms.utils.torch.os.system", "_args_": _touch(m)},
     "monai.transforms.utils.torch.os.system"),
    ("builtins.exec", lambda m, f: {"_target_": "medseg.data.transforms.torch.builtins.exec",
                                    "_args_": [f"open({str(m)!r}, 'w')"]}, "torch.builtins.exec"),
    ("oc.decode", lambda m, f: "${oc.decode:'{_target_: medseg.data.transforms.torch.os.system, _args_: [\"touch "
                               + str(m) + "\"]}'}", "oc.decode"),
    ("oc.env", lambda m, f: {"_target_": "monai.transforms.EnsureTyped", "keys": "${oc.env:HOME}"}, "oc.env"),
    ("nested-in-args", lambda m, f: {"_target_": "monai.transforms.EnsureTyped", "keys": "image",
                                     "_args_": [{"_target_": "medseg.data.transforms.torch.load",
                                                 "f": str(f / "evil.pt"), "weights_only": False}]},
     "_args_[0]._target_"),
    ("escaped", lambda m, f: {"_target_": "monai.transforms.EnsureTyped", "keys": "\\${oc.env:HOME}"}, "oc.env"),
    ("special-key", lambda m, f: {"_target_": "monai.transforms.EnsureTyped", "keys": "image", "_call_": True},
     "_call_"),
]  # fmt: skip


@pytest.fixture
def payload_release(release_copy, edit_config, tmp_path):
    """``make(payload) -> (folder, marker)``: a merged release whose preprocessing ends with ``payload``; the release
    also ships ``evil.pt``, a pickle that creates ``marker`` if it is ever unpickled."""

    def make(payload):
        folder, marker = release_copy("merged"), tmp_path / "marker"
        torch.save({"x": _WritesMarker(marker)}, folder / "evil.pt")
        edit_config(folder, lambda c: c["data"]["preprocess"]["transforms"].append(payload(marker, folder)))
        return folder, marker

    return make


@pytest.mark.parametrize(("payload", "named"), [p[1:] for p in PAYLOADS], ids=[p[0] for p in PAYLOADS])
def test_payload_refused_by_load_verify_and_predict(payload_release, payload, named, tmp_path, capsys):
    folder, marker = payload_release(payload)
    with pytest.raises(ConfigError, match="is not allowed in a release") as info:
        load_release(folder)
    assert str(folder / "config.yaml") in str(info.value) and named in str(info.value)

    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    (failed,) = [line for line in out.splitlines() if "[FAIL]" in line]
    assert failed.startswith("  [FAIL] metadata:") and named in failed

    example = next((folder / "example").glob("image_*.nii.gz"))
    out_dir = tmp_path / "out"
    code = main(["predict", "-m", str(folder), "-i", str(example), "-o", str(out_dir), "--device", "cpu",
                 "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("medseg predict: error: ") and named in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists() or not any(out_dir.iterdir())
    assert not marker.exists(), "the payload ran"


def test_python_object_tag_is_one_line_config_error(release_copy, tmp_path, capsys):
    folder, marker = release_copy("merged"), tmp_path / "marker"
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text + f'notes: !!python/object/apply:os.system ["touch {marker}"]\n')
    write_checksums(folder)
    with pytest.raises(ConfigError, match=r"config\.yaml, line \d+: not a plain YAML release config .*python") as info:
        load_release(folder)
    assert str(folder / "config.yaml") in str(info.value) and "\n" not in str(info.value)
    assert main(["verify", str(folder)]) == 1
    assert "[FAIL] metadata: " + str(folder / "config.yaml") in capsys.readouterr().out
    assert not marker.exists()


def test_plain_references_are_resolved_before_the_check(release_copy, edit_config):
    folder = release_copy("merged")

    def hide(config):
        config["aliases"] = {"loader": "medseg.data.transforms.torch.load", "window": "monai.transforms.EnsureTyped"}
        config["data"]["preprocess"]["transforms"][-1]["_target_"] = "${aliases.window}"

    edit_config(folder, hide)
    config = read_release_config(folder)  # a plain reference to an allowed target is fine, and comes back resolved
    assert config.data.preprocess.transforms[-1]._target_ == "monai.transforms.EnsureTyped"
    edit_config(folder, lambda c: c["data"]["preprocess"]["transforms"][-1].update(_target_="${aliases.loader}"))
    with pytest.raises(ConfigError, match=r"_target_ = 'medseg\.data\.transforms\.torch\.load' is not allowed"):
        read_release_config(folder)


def test_allowed_targets_are_exact_names_of_existing_callables():
    for target in ALLOWED_TARGETS:
        assert not target.endswith(".") and callable(_locate(target)), target
    assert "medseg.data.transforms.torch.load" not in ALLOWED_TARGETS
