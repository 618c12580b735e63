"""Target patterns: suffix and glob matching, containers, and the error that lists the model's module names."""

from __future__ import annotations

import pytest
from torch import nn

from medseg.adapters import AdapterConfig, TargetError, apply_adapters
from medseg.adapters.targets import resolve_targets
from medseg.errors import ConfigError, MedsegError


def test_suffix_glob_and_container_patterns(build):
    sam, vit = build("sam"), build("mae")
    assert list(resolve_targets(sam, ["qkv"], (nn.Linear,), "t")) == [
        "image_encoder.blocks.0.attn.qkv",
        "image_encoder.blocks.1.attn.qkv",
    ]
    # "mlp" is a container: its linears, whatever the family calls them
    assert sorted(resolve_targets(sam, ["mlp"], (nn.Linear,), "t")) == [
        f"image_encoder.blocks.{i}.mlp.{n}" for i in (0, 1) for n in ("lin1", "lin2")
    ]
    assert sorted(resolve_targets(vit, ["mlp"], (nn.Linear,), "t")) == [
        f"vit.blocks.{i}.mlp.{n}" for i in (0, 1) for n in ("fc1", "fc2")
    ]
    assert list(resolve_targets(vit, ["blocks.1.attn.*"], (nn.Linear,), "t")) == [
        "vit.blocks.1.attn.qkv",
        "vit.blocks.1.attn.proj",
    ]
    # "proj" also names the patch embedding's convolution, which a Linear-only method skips
    assert "vit.patch_embed.proj" not in resolve_targets(vit, ["proj"], (nn.Linear,), "t")
    # a partial component is not a suffix match
    with pytest.raises(TargetError):
        resolve_targets(vit, ["kv"], (nn.Linear,), "t")


@pytest.mark.parametrize(
    ("config", "family"),
    [
        ({"method": "lora", "targets": ["qkv", "attn.q_proj"]}, "sam"),
        ({"method": "ssf", "targets": ["to_qkv"]}, "tinyvit"),
        ({"method": "norm", "targets": ["decoder"]}, "mae"),
        ({"method": "bitfit", "targets": ["encoder.layers"]}, "dinov2"),
        ({"method": "lora", "trainable": ["nekc"]}, "sam"),
    ],
)
def test_pattern_matching_nothing_lists_module_names(config, family, build):
    with pytest.raises(TargetError) as info:
        apply_adapters(build(family), config)
    message = str(info.value)
    assert isinstance(info.value, MedsegError)
    assert "matches no" in message
    # the available names are listed, block indices collapsed, with their types
    expected = {
        "sam": "image_encoder.blocks.*.attn.qkv (Linear)",
        "tinyvit": "image_encoder.layers.*.blocks.*.attn.qkv (Linear)",
        "mae": "vit.blocks.*.norm1 (LayerNorm)",
        "dinov2": "vit.blocks.*.mlp.fc1 (Linear)",
    }[family]
    assert expected in message
    assert "blocks.0." not in message  # abbreviated, not one line per block


def test_unknown_method_and_option_are_config_errors():
    with pytest.raises(ConfigError, match="Available: .*lora"):
        AdapterConfig(method="loar")
    with pytest.raises(ConfigError, match="its options are: .*rank"):
        AdapterConfig(method="lora", rnak=4)
    with pytest.raises(ConfigError, match="do not combine"):
        AdapterConfig(methods=[{"method": "frozen"}, {"method": "lora"}])
    with pytest.raises(ConfigError, match="either `method`"):
        AdapterConfig()
    with pytest.raises(ConfigError, match="rank must be"):
        apply_adapters(nn.Sequential(nn.Linear(2, 2)), {"method": "lora", "rank": 0, "targets": ["0"]})


def test_trainable_patterns_unfreeze_whole_modules(build):
    model = build("sam")
    report = apply_adapters(model, {"method": "lora", "trainable": ["neck"]})
    neck = {f"image_encoder.neck.{n}" for n, _ in model.image_encoder.neck.named_parameters()}
    assert neck <= {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(report["trained"]["trainable"]) == neck
