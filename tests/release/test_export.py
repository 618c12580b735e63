"""Export -> verify -> load -> predict round trip on a tiny trained run, in both weight modes."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from medseg.errors import ConfigError
from medseg.evaluation.summary import medseg_metrics, read_summary
from medseg.release.card import read_front_matter
from medseg.release.example import compare_label_maps, predict_label_map, read_example
from medseg.release.export import export_release, run_export
from medseg.release.load import load_release
from medseg.release.verify import verify_release

FILES = {"model.safetensors", "config.yaml", "metadata.json", "model_card.md", "sha256sums.txt"}


def _keys(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys()), json.loads(handle.metadata()["medseg_release"])


def test_adapter_only_release_round_trip(tiny_run, tiny_releases, base_weights_env):
    folder = tiny_releases["adapter-only"]
    assert {p.name for p in folder.iterdir()} >= FILES
    config = yaml.safe_load((folder / "config.yaml").read_text())
    base = config["weights"]["base"]
    assert base["file"] == "tiny_mae.safetensors" and len(base["sha256"]) == 64
    assert config["model"]["checkpoint"] is None  # no path of the training machine
    assert config["data"]["preprocess"]["transforms"][1]["pixdim"] == [1.5, 1.5, 3.0]
    keys, header = _keys(folder)
    assert header["mode"] == "adapter-only"
    backbone = {k for k in keys if k.startswith("backbone.")}
    assert backbone and all("lora_" in k for k in backbone), sorted(backbone)[:5]
    assert any(k.startswith("decoder.") for k in keys)

    report = verify_release(folder)
    assert report.passed, [(c.name, c.detail) for c in report.checks]
    assert [c.name for c in report.checks] == ["checksums", "metadata", "rebuild", "example"]

    loaded = load_release(folder)
    assert loaded.kind == "dense" and loaded.label_names[0] == "background"
    assert loaded.extras["base_weights"].endswith("tiny_mae.safetensors")
    example = read_example(folder)
    predicted = predict_label_map(loaded, [folder / name for name in example["inputs"]])
    expected = np.asarray(nib.load(str(folder / example["expected"])).dataobj)
    assert predicted.shape == expected.shape == nib.load(str(folder / example["inputs"][0])).shape
    assert np.array_equal(predicted, expected)


def test_metadata_and_card_carry_the_run_summary(tiny_run, tiny_releases):
    folder = tiny_releases["adapter-only"]
    summary = read_summary(tiny_run["run_dir"] / "summary.json")
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["name"] == "tiny-test" and metadata["version"] == "1.2.3"
    assert metadata["eval_metrics"]["foreground_mean"] == medseg_metrics(summary)["foreground_mean"]
    assert metadata["eval_metrics"]["per_class"] == medseg_metrics(summary)["mean"]  # by class name, not label value
    assert metadata["input_format"]["spacing_mm"] == [1.5, 1.5, 3.0]
    assert metadata["input_format"]["orientation"] == "RAS"
    assert metadata["input_format"]["intensity"]["method"] == "ct_window"
    assert metadata["input_format"]["slice_size_px"] == 64
    assert metadata["labels"] == summary["labels"]
    assert metadata["prompt_types"] == []
    assert metadata["training"]["trainable_params"] == summary["trainable_params"] > 0

    card = (folder / "model_card.md").read_text()
    front = read_front_matter(card)
    assert front["library_name"] == "medseg" and front["license"] == "apache-2.0"
    assert "base_model" not in front and "datasets" not in front  # no Hub ids: a tiny base file, a local dataset
    assert front["base_model_file"]["file"] == "tiny_mae.safetensors"
    metrics = front["model-index"][0]["results"][0]["metrics"]
    dice = next(m for m in metrics if m["name"] == "foreground mean Dice")
    assert dice["value"] == round(summary["foreground_mean"]["dice"], 4)
    assert f"{summary['foreground_mean']['dice']:.3f}" in card


def test_merged_and_adapter_only_predict_the_same(tiny_releases, base_weights_env):
    adapter = load_release(tiny_releases["adapter-only"])
    merged = load_release(tiny_releases["merged"])
    keys, header = _keys(tiny_releases["merged"])
    assert header["mode"] == "merged" and not any(".base_layer." in k or "lora_" in k for k in keys)
    config = yaml.safe_load((tiny_releases["merged"] / "config.yaml").read_text())
    assert "base" not in config["weights"] and config["weights"]["layout"] == "plain"
    assert config["model"]["adapter"] is None  # LoRA folded in: the plain architecture
    image = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = adapter.model(image)
        assert torch.allclose(reference, merged.model(image), atol=1e-4)
        for name, parameter in adapter.model.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
        assert (adapter.model(image) - reference).abs().max() > 1e-2  # LoRA matters: the tolerance above is meaningful
    adapter = load_release(tiny_releases["adapter-only"])
    folder = tiny_releases["adapter-only"]
    example = read_example(folder)
    inputs = [folder / name for name in example["inputs"]]
    result = compare_label_maps(
        predict_label_map(merged, inputs), predict_label_map(adapter, inputs), adapter.label_names
    )
    assert result["passed"], result
    assert verify_release(tiny_releases["merged"]).passed


def test_export_is_reproducible(tiny_run, tiny_releases, tmp_path):
    again = export_release(tiny_run["run_dir"], tmp_path / "again", name="tiny-test", version="1.2.3", mode="merged")
    original = tiny_releases["merged"]
    for name in ("model.safetensors", "config.yaml", "example/expected_label.nii.gz"):
        assert (again / name).read_bytes() == (original / name).read_bytes(), name


def test_export_refuses_bad_requests(tiny_run, tiny_releases, tmp_path):
    run_dir = tiny_run["run_dir"]
    with pytest.raises(ConfigError, match="not empty"):
        export_release(run_dir, tiny_releases["merged"])
    with pytest.raises(ConfigError, match="semantic"):
        export_release(run_dir, tmp_path / "r", version="1.0")
    with pytest.raises(ConfigError, match="lower-case"):
        export_release(run_dir, tmp_path / "r", name="Bad Name")
    with pytest.raises(ConfigError, match="exclude each other"):
        run_export(run_dir, tmp_path / "r", merge=True, adapter_only=True)
    assert not (tmp_path / "r").exists()


def _texts(folder) -> tuple[dict, list[str]]:
    metadata = json.loads((folder / "metadata.json").read_text())
    card = (folder / "model_card.md").read_text()
    return metadata, [metadata["description"], metadata["intended_use"], *metadata["limitations"], card]


def test_metadata_names_the_real_backbone_model_and_dataset(tiny_run, tiny_releases):
    # The run was evaluated by `medseg evaluate` alone: its summary.json lacks backbone, model and dataset.
    assert not {"backbone", "model", "dataset"} & set(read_summary(tiny_run["run_dir"] / "summary.json"))
    metadata, texts = _texts(tiny_releases["adapter-only"])
    assert [t for t in texts if "None" in t] == []
    assert metadata["description"].endswith(
        "backbone mae_vit_base (pretrained) with a lora adapter, model tiny-vit_unetr, fine-tuned with medseg on "
        "Dataset990_Synthetic."
    )
    assert metadata["training"]["model"] == "tiny-vit_unetr" and metadata["training"]["steps_trained"] == 3
    assert metadata["training_data"]["dataset"] == "Dataset990_Synthetic" and metadata["training_data"]["fold"] == 0


def test_baseline_release_is_described_as_trained_from_scratch(tiny_unet_run, tmp_path):
    folder = export_release(tiny_unet_run, tmp_path / "unet", name="tiny-unet", version="0.1.0")
    metadata, texts = _texts(folder)
    assert [t for t in texts if "None" in t] == []
    assert (
        "model unet2d trained from scratch (no pretrained backbone) with medseg on Dataset990_Synthetic."
        in (metadata["description"])
    )
    training = metadata["training"]
    assert (training["backbone"], training["model"], training["init"], training["adapter"]) == (
        "none", "unet2d", "scratch", "full",
    )  # fmt: skip
    assert "Model `unet2d` trained from scratch" in texts[-1]
    assert "base_model" not in read_front_matter(texts[-1])  # a from-scratch baseline has no base model
    assert verify_release(folder).passed


def test_dataset_label_codes_travel_into_the_release(tiny_unet_run, tmp_path):
    """A release keeps dataset.json's DICOM SEG codes, so `medseg predict -m RELEASE` writes them without the data."""
    from omegaconf import OmegaConf

    data = shutil.copytree(tiny_unet_run.parents[3] / "data", tmp_path / "data")
    run = shutil.copytree(tiny_unet_run, tmp_path / "run")
    config = OmegaConf.load(run / ".hydra" / "config.yaml")
    config.paths.data_dir = str(data)
    OmegaConf.save(config, run / ".hydra" / "config.yaml")
    (dataset_json,) = data.glob("*/dataset.json")
    description = json.loads(dataset_json.read_text())
    liver = {"category": ["123037004", "SCT", "Anatomical Structure"], "type": ["10200004", "SCT", "Liver"]}
    description["label_codes"] = {"liver": liver}
    dataset_json.write_text(json.dumps(description))
    folder = export_release(run, tmp_path / "coded", name="tiny-unet", version="0.1.0")
    assert yaml.safe_load((folder / "config.yaml").read_text())["label_codes"] == {"liver": liver}
    assert load_release(folder).extras["label_codes"] == {"liver": liver}
    plain = export_release(tiny_unet_run, tmp_path / "plain", name="tiny-unet", version="0.1.0")
    assert "label_codes" not in load_release(plain).extras
