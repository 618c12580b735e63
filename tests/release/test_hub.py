"""The card the Hub shows: README.md is model_card.md, huggingface_hub reads it, and its metadata holds Hub
identifiers only where they are real."""

from __future__ import annotations

import copy
import json

import pytest
from huggingface_hub import ModelCard

from medseg.release.card import read_front_matter, render_model_card
from medseg.release.checksums import read_checksums, write_checksums
from medseg.release.verify import verify_release


def test_readme_is_the_card_and_huggingface_hub_reads_it(tiny_releases):
    for mode, folder in tiny_releases.items():
        readme = folder / "README.md"
        assert readme.read_bytes() == (folder / "model_card.md").read_bytes(), mode
        assert "README.md" in read_checksums(folder)
        card = ModelCard.load(readme)
        assert card.data.license == "apache-2.0" and card.data.library_name == "medseg"
        assert card.data.datasets is None  # medseg's datasets are not Hub datasets
        assert card.data.base_model is None  # the tiny base is no official checkpoint
        (result, *_) = card.data.eval_results
        assert result.task_type == "image-segmentation" and result.metric_type == "dice"


def _metadata(folder) -> dict:
    return json.loads((folder / "metadata.json").read_text())


def test_base_model_is_the_official_hub_repository_or_left_out(tiny_releases):
    metadata = _metadata(tiny_releases["adapter-only"])
    official = copy.deepcopy(metadata)
    official["weights"]["base"]["url"] = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
    front = read_front_matter(render_model_card(official))
    assert (front["base_model"], front["base_model_relation"]) == ("facebook/vit-mae-base", "adapter")
    assert front["base_model_file"]["sha256"] == metadata["weights"]["base"]["sha256"]
    official["training"]["backbone"] = "litemedsam"  # published on GitHub and PyPI, not on the Hub
    assert "base_model" not in read_front_matter(render_model_card(official))
    merged = _metadata(tiny_releases["merged"])
    assert merged["training"]["pretrained_weights"] == {"file": "tiny_mae.safetensors", "official": False}
    assert "base_model" not in read_front_matter(render_model_card(merged))
    merged["training"]["pretrained_weights"] = {"file": "mae_pretrain_vit_base.pth", "official": True}
    front = read_front_matter(render_model_card(merged))
    assert (front["base_model"], front["base_model_relation"]) == ("facebook/vit-mae-base", "finetune")


@pytest.mark.parametrize(
    ("licence", "expected"),
    [
        ("Apache-2.0", {"license": "apache-2.0"}),
        ("CC-BY-NC-4.0", {"license": "cc-by-nc-4.0"}),
        ("MNI ICBM152", {"license": "other", "license_name": "mni-icbm152"}),
    ],
)
def test_licence_is_a_hub_identifier_or_other_with_its_name(tiny_releases, licence, expected):
    metadata = _metadata(tiny_releases["merged"])
    metadata["licence"] = licence
    front = read_front_matter(render_model_card(metadata))
    assert {k: front[k] for k in expected} == expected and ("license_name" in front) == ("license_name" in expected)


def test_verify_refuses_a_readme_that_is_not_the_card(release_copy):
    folder = release_copy("merged")
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("image-segmentation", "text-generation", 1))
    write_checksums(folder)  # consistent checksums: only the content check can see it
    report = verify_release(folder)
    assert not report.passed and report.checks[-1].name == "metadata"
    assert "README.md differs from model_card.md" in report.checks[-1].detail
