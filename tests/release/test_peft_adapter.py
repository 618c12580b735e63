"""Adapter-only releases in PEFT's layout: ``peft`` loads them onto medseg's base model and predicts what medseg's
own loader predicts; methods PEFT cannot represent keep medseg's format alone, and the card says why."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from medseg.backbones import create_backbone
from medseg.models import build_segmenter
from medseg.release.load import load_release
from medseg.release.peft_adapter import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    build_peft_base,
    peft_blocker,
    write_peft_adapter,
)
from medseg.release.spec import read_release_config
from medseg.release.weights import export_tensors

from .conftest import BASE_FILE

ARCH = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}


def _image() -> torch.Tensor:
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))


def _peft_load(base: torch.nn.Module, folder) -> torch.nn.Module:
    """peft's own loading, checked key by key: nothing in the file is left over, no adapter tensor is missing."""
    model = get_peft_model(base, LoraConfig.from_pretrained(str(folder)))
    result = set_peft_model_state_dict(model, load_file(str(folder / PEFT_WEIGHTS)))
    assert not result.unexpected_keys, result.unexpected_keys[:5]
    assert not [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k], result.missing_keys[:5]
    return model.eval()


def test_adapter_only_release_loads_with_peft(tiny_run, tiny_releases, base_weights_env):
    folder = tiny_releases["adapter-only"]
    config = json.loads((folder / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["decoder"]
    assert all(name.startswith("backbone.") for name in config["target_modules"])
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["peft"]["files"] == [PEFT_CONFIG, PEFT_WEIGHTS]
    ours = load_release(folder)
    base_file = tiny_run["weights"] / BASE_FILE
    theirs = PeftModel.from_pretrained(build_peft_base(read_release_config(folder), base_file), str(folder)).eval()
    checked = _peft_load(build_peft_base(read_release_config(folder), base_file), folder)
    saved = get_peft_model_state_dict(checked)  # the names peft itself writes in save_pretrained
    assert set(saved) == set(load_file(str(folder / PEFT_WEIGHTS)))
    with torch.no_grad():
        reference = ours.model(_image())
        assert torch.allclose(theirs(_image()), reference, atol=1e-5)
        assert torch.allclose(checked(_image()), reference, atol=1e-5)
        for name, parameter in checked.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
        assert (checked(_image()) - reference).abs().max() > 1e-3  # the LoRA tensors matter


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny MAE-shaped ViT saved as a base file, as an official checkpoint would be."""
    torch.manual_seed(1)
    backbone = create_backbone("mae_vit_base", pretrained=False, arch=ARCH, img_size=64)
    path = tmp_path_factory.mktemp("peft_base") / BASE_FILE
    save_file({k: v.contiguous() for k, v in backbone.vit.state_dict().items()}, str(path))
    return path


def _adapted(base_file, adapter: dict) -> tuple[dict, torch.nn.Module]:
    model_cfg = {
        "backbone": "mae_vit_base", "pretrained": True, "checkpoint": str(base_file), "decoder": "unetr",
        "num_classes": 3, "in_channels": 1, "img_size": 64, "arch": ARCH, "feature_size": 4,
    }  # fmt: skip
    model = build_segmenter(**model_cfg, adapter=adapter).eval()
    model_cfg = {"_target_": "medseg.models.build_segmenter", **model_cfg}  # as config.yaml states it
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a trained adapter: no tensor at its initial value
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return {"model": model_cfg}, model


@pytest.mark.parametrize("method", ["lora", "dora", "lora_bonly"])
def test_peft_layout_of_lora_and_dora_predicts_like_medseg(tiny_base, tmp_path, method):
    config, model = _adapted(tiny_base, {"method": method, "rank": 4, "alpha": 8})
    tensors = export_tensors(model, "adapter-only")
    assert peft_blocker(model, tensors) is None
    write_peft_adapter(tmp_path, model, tensors, "facebook/vit-mae-base")
    written = json.loads((tmp_path / PEFT_CONFIG).read_text())
    assert written["use_dora"] is (method == "dora") and written["base_model_name_or_path"] == "facebook/vit-mae-base"
    if method == "dora":
        assert any(k.endswith("lora_magnitude_vector") for k in load_file(str(tmp_path / PEFT_WEIGHTS)))
    loaded = _peft_load(build_peft_base(config, tiny_base), tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(_image()), model(_image()), atol=1e-5)


@pytest.mark.parametrize(
    ("adapter", "named"),
    [
        ({"method": "adaptformer"}, "adaptformer"),
        ({"method": "ssf"}, "ssf"),
        ({"method": "vpt", "num_tokens": 2}, "vpt"),
        ({"method": "bitfit"}, "bitfit"),
        ({"methods": [{"method": "lora"}, {"method": "norm"}]}, "norm"),
        ({"method": "lora", "trainable": ["blocks.1.norm1"]}, "trainable"),
    ],
)
def test_methods_peft_cannot_represent_are_named(tiny_base, adapter, named):
    _, model = _adapted(tiny_base, adapter)
    reason = peft_blocker(model, export_tensors(model, "adapter-only"))
    assert reason is not None and named in reason
