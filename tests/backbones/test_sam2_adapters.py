"""Parameter-efficient methods on SAM 2's Hiera: which apply, that they start as the base model and that only they
train; VPT is refused. A tiny Hiera (widths 16-128, 5 blocks) at 64 px keeps every case quick."""

from __future__ import annotations

import pytest
import torch

from medseg.adapters import apply_adapters, merge_adapters, unmerge_adapters
from medseg.adapters.blocks import find_blocks
from medseg.adapters.targets import resolve_targets
from medseg.backbones import create_backbone
from medseg.backbones.sam2_configs import MISSING_EXTRA, require_sam2
from medseg.errors import ConfigError

try:
    require_sam2()
except ConfigError:
    pytest.skip(MISSING_EXTRA, allow_module_level=True)

# 4 stages of 1, 1, 2, 1 blocks (widths 16, 32, 64, 128), the 4th block global, as Hiera-T's layout in miniature.
TINY = {"embed_dim": 16, "num_heads": 1, "stages": [1, 1, 2, 1], "global_att_blocks": [3]}
SIZE = 64
ZERO_INIT = ["lora", "lora_bonly", "dora", "adaptformer", "ssf", "bitfit", "norm", "adapter3d"]


def tiny_hiera(**kwargs):
    torch.manual_seed(0)
    return create_backbone("sam2_hiera_t", pretrained=False, arch=TINY, img_size=SIZE, **kwargs)


def loss_of(model, x):
    out = model(x, layers=(0, 2))
    return out.features.square().mean() + sum(t.square().mean() for t in out.intermediates)


def test_hiera_blocks_are_sites_at_their_output_width():
    model = tiny_hiera()
    sites = find_blocks(model)
    assert [s.name for s in sites] == [f"image_encoder.trunk.blocks.{i}" for i in range(5)]
    assert [s.dim for s in sites] == [16, 32, 64, 64, 128] == model.block_dims
    assert {s.layout for s in sites} == {"nhwc"}


@pytest.mark.parametrize("method", ZERO_INIT)
def test_method_starts_as_the_base_model_and_only_it_trains(method):
    model = tiny_hiera().train()
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        base = model(x, layers=(0, 2))
    report = apply_adapters(model, {"method": method})
    trained = set(report["trained"][method])
    assert trained and trained == {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        start = model(x, layers=(0, 2))
    assert (start.features - base.features).abs().max() <= 1e-5
    for got, want in zip(start.intermediates, base.intermediates, strict=True):
        assert (got - want).abs().max() <= 1e-5

    loss_of(model, x).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) <= trained  # nothing frozen receives a gradient
    assert any(g.abs().sum() > 0 for g in grads.values())
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    optimiser.step()
    with torch.no_grad():
        assert (model(x, layers=(0, 2)).features - base.features).abs().max() > 1e-6


def test_block_adapters_sit_on_every_hiera_block():
    model = tiny_hiera()
    apply_adapters(model, {"methods": [{"method": "adaptformer"}, {"method": "adapter3d"}]})
    blocks = model.image_encoder.trunk.blocks
    assert [b.adaptformer.up.out_features for b in blocks] == [16, 32, 64, 64, 128]
    assert [b.adapter3d.up.out_features for b in blocks] == [16, 32, 64, 64, 128]


def test_lora_targets_on_hiera():
    model = tiny_hiera()
    linear = (torch.nn.Linear,)
    assert len(resolve_targets(model, ["qkv"], linear, "lora")) == 5
    assert len(resolve_targets(model, ["attn.proj"], linear, "lora")) == 5
    # `proj` also names the shortcut projection of each stage's first block (widths change there)
    shortcuts = {n for n in resolve_targets(model, ["proj"], linear, "lora") if not n.endswith("attn.proj")}
    assert shortcuts == {f"image_encoder.trunk.blocks.{i}.proj" for i in (1, 2, 4)}
    assert len(resolve_targets(model, ["mlp"], linear, "lora")) == 10  # mlp.layers.0 and .1 of every block


def test_vpt_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"vpt: .*'nhwc'.*prompt tokens have no place"):
        apply_adapters(tiny_hiera(), {"method": "vpt"})


def test_late_adaptation_runs_the_frozen_blocks_without_gradients():
    model = tiny_hiera().train()
    apply_adapters(model, {"method": "lora", "last_k_blocks": 2})
    x = torch.rand(1, 1, SIZE, SIZE)
    assert model.block_runner(x).frozen == 3
    loss_of(model, x).backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    late = ("image_encoder.trunk.blocks.3.", "image_encoder.trunk.blocks.4.")
    assert grads and all(n.startswith(late) for n in grads)


@pytest.mark.parametrize("method", ["lora", "dora", "ssf"])
def test_mergeable_methods_fold_into_the_weights(method):
    model = tiny_hiera().eval()
    apply_adapters(model, {"method": method, "targets": ["qkv", "proj", "mlp"]})
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    x = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        adapted = model(x).features
        assert merge_adapters(model)
        merged = model(x).features
        unmerge_adapters(model)
        unmerged = model(x).features
    assert (merged - adapted).abs().max() <= 1e-5 and (unmerged - adapted).abs().max() <= 1e-5


def test_activation_checkpointing_keeps_loss_and_gradients():
    x = torch.rand(2, 1, SIZE, SIZE)
    results = []
    for spec in ("none", "all"):
        model = tiny_hiera(activation_checkpointing=spec).train()
        loss = loss_of(model, x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6) for n in grads_a)
