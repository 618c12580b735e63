"""The 3-D adapter mixes slices of one volume (and only of one volume); composition with other methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.adapters import Adapter3d, VolumeDepthError, apply_adapters, set_volume_depth, volume_depth

DEPTH = 3


def _activate(model: nn.Module, seed: int = 0) -> None:
    """Give every up-projection non-zero weights (at init they are zero and the adapter is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Adapter3d):
                module.up.weight.copy_(torch.randn(module.up.weight.shape, generator=generator) * 0.5)


def _volumes(family: str, inputs, volumes: int = 2) -> torch.Tensor:
    """``volumes * DEPTH`` slices, volume-major."""
    return inputs(family, batch=volumes * DEPTH)


def test_mixes_neighbouring_slices_within_a_volume(family, build, inputs):
    model = build(family)
    apply_adapters(model, {"method": "adapter3d", "bottleneck": 8})
    _activate(model)
    x = _volumes(family, inputs)
    changed = x.clone()
    changed[2] += 1.0  # volume 0, last slice
    with torch.no_grad(), volume_depth(model, DEPTH):
        before, after = model(x).features, model(changed).features
    diff = (after - before).abs().flatten(1).amax(1)
    assert diff[1] > 1e-4, "slice 1 does not see its neighbour, slice 2"
    assert diff[0] > 0, "two blocks deep, slice 0 sees slice 2 through slice 1"
    assert torch.all(diff[DEPTH:] == 0), "slices of another volume must not change"
    # outside the context, each image is its own volume: slice 1 no longer depends on slice 2
    with torch.no_grad():
        alone = (model(changed).features - model(x).features).abs().flatten(1).amax(1)
    assert alone[1] == 0 and alone[2] > 0


def test_is_identity_at_init_even_on_volumes(family, build, inputs):
    base, model = build(family), build(family)
    apply_adapters(model, {"method": "adapter3d", "bottleneck": 8})
    x = _volumes(family, inputs)
    with torch.no_grad(), volume_depth(model, DEPTH):
        torch.testing.assert_close(model(x).features, base(x).features, atol=1e-6, rtol=0)


def test_depth_must_divide_the_batch_and_context_restores(build, inputs):
    model = build("sam")
    apply_adapters(model, {"method": "adapter3d", "bottleneck": 4})
    with pytest.raises(VolumeDepthError, match="not a whole number of volumes"), volume_depth(model, 4):
        model(inputs("sam", batch=6))
    assert all(m.depth is None for m in model.modules() if isinstance(m, Adapter3d))
    assert set_volume_depth(model, 2) == 2  # both blocks
    with pytest.raises(VolumeDepthError):
        set_volume_depth(model, 0)


def test_composes_with_norm(family, build, inputs, with_head):
    model = with_head(build(family))
    apply_adapters(model.backbone, {"methods": [{"method": "adapter3d", "bottleneck": 4}, {"method": "norm"}]})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapter3d." in n for n in trainable)
    assert any(n.endswith(("norm1.weight", "norm.weight")) for n in trainable)
    assert not any(n.endswith(("qkv.weight", "fc1.weight", "lin1.weight")) for n in trainable)
    with volume_depth(model, 2):
        model(inputs(family, batch=4)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".adapter3d.up." in n)


def test_lora_composes_with_norm_and_the_decoder_trains(build, inputs, with_head):
    model = with_head(build("dinov2"))
    report = apply_adapters(model.backbone, {"methods": [{"method": "lora", "rank": 2}, {"method": "norm"}]})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert any(".lora_B." in n for n in trainable) and "backbone.vit.norm.weight" in trainable
    assert report["methods"] == ["lora", "norm"]
    # peft freezes everything it does not own; the norm unfreezing must survive it whichever order is used
    other = with_head(build("dinov2"))
    apply_adapters(other.backbone, {"methods": [{"method": "norm"}, {"method": "lora", "rank": 2}]})
    assert {n for n, p in other.named_parameters() if p.requires_grad} == trainable


def test_adapted_model_deepcopies_with_its_hooks(build, inputs):
    """Hooks hold their adapters: a deep copy (EMA weights, a second fold) runs its own copies, not the original's."""
    import copy

    model = build("dinov2")
    apply_adapters(model, {"methods": [{"method": "adapter3d", "bottleneck": 4}, {"method": "vpt", "num_tokens": 2}]})
    _activate(model)
    twin = copy.deepcopy(model)
    x = inputs("dinov2", batch=4)
    with torch.no_grad(), volume_depth(twin, 2), volume_depth(model, 2):
        torch.testing.assert_close(twin(x).features, model(x).features)
        for module in twin.modules():
            if isinstance(module, Adapter3d):
                module.up.weight.zero_()
        assert not torch.allclose(twin(x).features, model(x).features)
