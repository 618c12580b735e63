"""`medseg verify` checks that metadata.json is JSON and states the facts config.yaml builds, naming both values.

Checksums are recomputed after each edit, as anyone who edits a release can do: they show that files are intact, not
that they agree, so only the metadata check can fail here.
"""

from __future__ import annotations

import json

import pytest

from medseg.cli import main
from medseg.release.checksums import write_checksums
from medseg.release.verify import CHECKS, verify_release


def _edit_metadata(folder, change):
    metadata = json.loads((folder / "metadata.json").read_text())
    change(metadata)
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2))
    write_checksums(folder)


def _swap_labels(m):
    m["labels"] = {"background": 0, "liver": 2, "kidney": 1, **{k: v for k, v in m["labels"].items() if v > 2}}


# (id, change to metadata.json, what the failed line must name: the field and both values)
CONTRADICTIONS = [
    ("labels", _swap_labels, ["labels: metadata.json says", "'liver': 2", "'liver': 1"]),
    ("classes", lambda m: m["labels"].pop("spleen"), ["number of classes: metadata.json says 4, config.yaml says 5"]),
    ("backbone", lambda m: m["training"].update(backbone="sam_vit_b"), ["'sam_vit_b'", "'mae_vit_base'"]),
    ("spacing", lambda m: m["input_format"].update(spacing_mm=[1.0, 1.0, 1.0]), ["[1.0, 1.0, 1.0]", "[1.5, 1.5, 3.0]"]),
    ("weights", lambda m: m["weights"].update(mode="merged"), ["weights: metadata.json says", "'adapter-only'"]),
]


@pytest.mark.parametrize(("change", "named"), [c[1:] for c in CONTRADICTIONS], ids=[c[0] for c in CONTRADICTIONS])
def test_metadata_contradicting_the_config_fails(release_copy, base_weights_env, change, named, capsys):
    folder = release_copy("adapter-only")
    assert json.loads((folder / "metadata.json").read_text())["labels"]["liver"] == 1  # what _swap_labels assumes
    _edit_metadata(folder, change)
    report = verify_release(folder)
    assert [(c.name, c.passed) for c in report.checks] == [("checksums", True), ("metadata", False)]
    assert not report.passed
    for text in named:
        assert text in report.checks[1].detail, (text, report.checks[1].detail)
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "[FAIL]" in line] == [f"  [FAIL] metadata: {report.checks[1].detail}"]


def test_metadata_that_is_not_json_fails_in_one_line(release_copy, capsys):
    folder = release_copy("merged")
    (folder / "metadata.json").write_text('{"name": "tiny-test", "labels": {')
    write_checksums(folder)
    assert main(["verify", str(folder)]) == 1
    captured = capsys.readouterr()
    (failed,) = [line for line in captured.out.splitlines() if "[FAIL]" in line]
    assert failed.startswith(f"  [FAIL] metadata: {folder / 'metadata.json'} is not JSON (")
    assert "Traceback" not in captured.err and "FAILED" in captured.err


def test_metadata_must_be_listed_in_the_checksums(release_copy):
    folder = release_copy("merged")
    sums = folder / "sha256sums.txt"
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if "metadata.json" not in line))
    report = verify_release(folder)
    assert [(c.name, c.passed) for c in report.checks] == [("checksums", False)]
    assert "does not list ['metadata.json']" in report.checks[0].detail  # refused as unchecked, not merely unlisted


def test_consistent_release_passes_every_check(tiny_releases, base_weights_env):
    report = verify_release(tiny_releases["adapter-only"])
    assert [c.name for c in report.checks] == list(CHECKS) and report.passed, report.checks
    assert "metadata.json agrees" in report.checks[1].detail
