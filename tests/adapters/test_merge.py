"""Merging LoRA/DoRA/SSF into the base weights, and adapter-only safetensors checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from medseg.adapters import (
    adapter_state_dict,
    apply_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from medseg.errors import WeightsError

MERGEABLE = ("lora", "dora", "ssf")
SAVEABLE = ("bitfit", "norm", "lora", "lora_bonly", "dora", "adaptformer", "adapter3d", "ssf", "vpt")


def _perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every adapter tensor away from its initial value (B = 0, up = 0, scale = 1 would make merging trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in adapter_state_dict(model).items():
            if tensor.is_floating_point() and tensor.ndim > 0:
                noise = torch.randn(tensor.shape, generator=generator) * 0.1
                tensor.add_(noise + 0.5 if name.endswith("ssf_scale") else noise)


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_gives_the_same_outputs(method, family, build, inputs):
    model = build(family)
    apply_adapters(model, {"method": method, "targets": ["qkv", "proj", "mlp"]})
    _perturb(model)
    x = inputs(family)
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("weight") and "lora_" not in n}
    with torch.no_grad():
        adapted = model(x).features
        merged_layers = merge_adapters(model)
        merged = model(x).features
    assert merged_layers
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert changed, "merging did not touch any base weight"
    assert (merged - adapted).abs().max() <= 1e-5
    unmerge_adapters(model)
    with torch.no_grad():
        unmerged = model(x).features
    assert (unmerged - adapted).abs().max() <= 1e-5
    for name, value in weights.items():
        torch.testing.assert_close(dict(model.named_parameters())[name], value, atol=1e-5, rtol=1e-5)


def test_merged_ssf_really_bypasses_the_hook(build, inputs):
    model = build("mae")
    apply_adapters(model, {"method": "ssf", "targets": ["qkv"]})
    _perturb(model)
    x = inputs("mae")
    merge_adapters(model)
    with torch.no_grad():
        merged = model(x).features
        for _, layer in [(n, m) for n, m in model.named_modules() if hasattr(m, "ssf_scale")]:
            layer.ssf_scale.fill_(7.0)  # ignored once merged: the weights carry the transform
        assert torch.equal(model(x).features, merged)


@pytest.mark.parametrize("method", SAVEABLE)
def test_adapter_checkpoint_round_trip(method, build, inputs, tmp_path):
    family = "mae" if method == "vpt" else "sam"
    model = build(family)
    apply_adapters(model, {"method": method})
    _perturb(model)
    x = inputs(family)
    with torch.no_grad():
        expected = model(x).features
    path = save_adapter(model, tmp_path / "adapter.safetensors", metadata={"backbone": "sam_vit_b"})
    with safe_open(str(path), framework="pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert keys == set(adapter_state_dict(model))
    assert meta["backbone"] == "sam_vit_b" and method in meta["adapter_config"]
    base_size = sum(t.numel() for k, t in model.state_dict().items() if k not in keys)
    assert sum(t.numel() for k, t in model.state_dict().items() if k in keys) < 0.25 * base_size

    fresh = build(family)  # the same base weights (same seed); adapters are applied from the file's config
    with torch.no_grad():
        assert not torch.allclose(fresh(x).features, expected, atol=1e-4)
    load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).features, expected, atol=1e-6, rtol=0)


def test_lora_bonly_checkpoint_keeps_the_frozen_random_a(build, tmp_path):
    model = build("sam")
    apply_adapters(model, {"method": "lora_bonly"})
    state = adapter_state_dict(model)
    frozen_a = [k for k in state if ".lora_A." in k]
    assert frozen_a and not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)


def test_checkpoint_of_merged_model_is_saved_unmerged(build, inputs, tmp_path):
    model = build("dinov2")
    apply_adapters(model, {"method": "lora"})
    _perturb(model)
    x = inputs("dinov2")
    with torch.no_grad():
        expected = model(x).features
    merge_adapters(model)
    path = save_adapter(model, tmp_path / "a.safetensors")
    fresh = build("dinov2")
    load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).features, expected, atol=1e-5, rtol=0)


def test_loading_onto_the_wrong_backbone_is_an_error(build, tmp_path):
    model = build("sam")
    apply_adapters(model, {"method": "lora"})
    path = save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(WeightsError, match="does not fit"):
        load_adapter(build("mae"), path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own header error
        load_adapter(build("sam"), tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        load_adapter(build("sam"), tmp_path / "missing.safetensors")
