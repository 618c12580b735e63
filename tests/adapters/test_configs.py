"""Every ``conf/adapter/*.yaml`` composes, instantiates to an AdapterConfig and applies; overrides take effect."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from medseg.adapters import AdapterConfig, apply_adapters
from medseg.config import instantiate

CONF = Path(__file__).resolve().parents[2] / "conf"
NAMES = sorted(p.stem for p in (CONF / "adapter").glob("*.yaml"))
REQUIRED = {
    "full", "frozen", "bitfit", "norm", "lora", "lora_bonly", "dora", "adaptformer", "adapter3d", "ssf",
    "vpt_shallow", "vpt_deep", "lora_norm", "adapter3d_norm",
}  # fmt: skip


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=list(overrides)).adapter


def test_every_documented_method_has_a_config():
    assert set(NAMES) >= REQUIRED


@pytest.mark.parametrize("name", NAMES)
def test_config_composes_and_applies(name, build):
    adapter = instantiate(_compose(f"+adapter={name}"))
    assert isinstance(adapter, AdapterConfig) and adapter.name == name
    family = "mae" if name.startswith("vpt") else "sam"
    model = build(family)
    assert adapter(model) is model
    report = model._medseg_adapter_methods, sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report[0] == adapter.methods
    if name == "frozen":
        assert report[1] == 0
    else:
        assert report[1] > 0


def test_command_line_override_of_the_rank():
    adapter = instantiate(_compose("+adapter=lora", "adapter.rank=4", "adapter.targets=[qkv]"))
    assert adapter.specs == [
        {
            "method": "lora",
            "rank": 4,
            "alpha": 16,
            "dropout": 0.0,
            "targets": ["qkv"],
            "train_a": True,
            "use_dora": False,
            "last_k_blocks": None,
        }
    ]


def test_rank_override_reaches_the_lora_matrices(build):
    model = build("dinov2")
    report = apply_adapters(model, instantiate(_compose("+adapter=lora", "adapter.rank=8")))
    a = model.vit.blocks[0].attn.qkv.lora_A["default"].weight
    assert a.shape[0] == 8
    assert report["groups"]["adapters"]["trainable"] == sum(
        p.numel() for n, p in model.named_parameters() if ".lora_" in n
    )


def test_composed_config_override_by_index(build):
    adapter = instantiate(_compose("+adapter=lora_norm", "adapter.methods.0.rank=2"))
    model = build("sam")
    adapter(model)
    assert model.image_encoder.blocks[0].attn.qkv.lora_B["default"].weight.shape[1] == 2
    assert model.image_encoder.blocks[0].norm1.weight.requires_grad


def test_config_round_trips_through_to_dict():
    adapter = instantiate(_compose("+adapter=adapter3d_norm"))
    again = AdapterConfig.from_dict(adapter.to_dict())
    assert again.specs == adapter.specs and again.name == adapter.name
