"""Activation checkpointing with adapters on every family: the same loss and gradients as without it (issue 18)."""

from __future__ import annotations

import pytest
import torch

from medseg.adapters import apply_adapters, volume_depth

CASES = [
    ("sam", {"method": "lora", "rank": 4}),
    ("sam", {"method": "adaptformer", "bottleneck": 8}),
    ("sam", {"method": "adapter3d", "bottleneck": 8}),
    ("tinyvit", {"method": "lora", "rank": 4}),
    ("tinyvit", {"method": "adapter3d", "bottleneck": 8}),
    ("tinyvit", {"method": "full"}),
    ("dinov2", {"method": "vpt", "num_tokens": 3, "deep": False}),
    ("mae", {"method": "vpt", "num_tokens": 3, "deep": True}),
    ("mae", {"method": "adapter3d", "bottleneck": 8}),
]


def _step(build, inputs, family, config, checkpointing):
    model = build(family)
    apply_adapters(model, config)
    torch.manual_seed(3)
    with torch.no_grad():  # adapters start as the identity; random values make every one of them matter
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_" in name or "adapt" in name or "vpt_" in name):
                param.normal_(0.0, 0.2)
    model.set_activation_checkpointing(checkpointing)
    model.train()
    with volume_depth(model, 2):  # adapter3d: two volumes of two slices; the others ignore it
        out = model(inputs(family, batch=4))
    loss = out.features.square().mean()
    loss.backward()  # outside volume_depth: the recomputed blocks must still see depth 2
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {n: b.clone() for n, b in model.named_buffers() if "running" in n}


@pytest.mark.parametrize(("family", "config"), CASES, ids=lambda c: c if isinstance(c, str) else c["method"])
def test_checkpointing_with_adapters_keeps_loss_and_gradients(build, inputs, family, config):
    loss_a, grads_a, stats_a = _step(build, inputs, family, config, "none")
    loss_b, grads_b, stats_b = _step(build, inputs, family, config, "all")
    assert torch.allclose(loss_a, loss_b)
    for name in stats_a:  # training BatchNorms (TinyViT under full) are not updated twice by the recomputation
        torch.testing.assert_close(stats_a[name], stats_b[name], atol=1e-6, rtol=1e-5, msg=name)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)
