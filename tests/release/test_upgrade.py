"""A release exported before README.md and the PEFT files gains them from its own files, and still verifies."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from medseg.release.checksums import read_checksums, write_checksums
from medseg.release.upgrade import add_hub_files, main
from medseg.release.verify import verify_release


def _as_old_export(folder) -> None:
    """What ``medseg export`` wrote before: no README.md or PEFT files, ``base_model`` a medseg name."""
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors"):
        (folder / name).unlink()
    metadata = json.loads((folder / "metadata.json").read_text())
    del metadata["peft"]
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2))
    card = (folder / "model_card.md").read_text()
    body = card.split("\n---\n", 1)[1]
    (folder / "model_card.md").write_text("---\nlicense: apache-2.0\nbase_model: mae_vit_base\n---\n" + body)
    write_checksums(folder)


def test_old_adapter_only_release_gains_hub_and_peft_files(release_copy, base_weights_env, capsys):
    folder = release_copy("adapter-only")
    weights = (folder / "model.safetensors").read_bytes()
    _as_old_export(folder)
    body = (folder / "model_card.md").read_text().split("\n---\n", 1)[1]
    assert main([str(folder)]) == 0
    assert "sums_sha256" in capsys.readouterr().out
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(read_checksums(folder))
    card = (folder / "model_card.md").read_text()
    assert (folder / "README.md").read_text() == card
    assert ModelCard.load(folder / "README.md").data.base_model is None
    assert body.split("## Input")[1] in card  # the card's own text is kept below the new front matter
    assert "PeftModel.from_pretrained" in card
    assert (folder / "model.safetensors").read_bytes() == weights
    assert json.loads((folder / "metadata.json").read_text())["peft"]["files"]
    assert verify_release(folder).passed
    assert add_hub_files(folder)  # running it again changes nothing that verify would refuse
    assert verify_release(folder).passed
