"""Visual prompt tuning on token-sequence ViTs: shapes kept, shallow vs deep prompts, unsupported families."""

from __future__ import annotations

import pytest
import torch

from medseg.adapters import apply_adapters
from medseg.errors import ConfigError


@pytest.mark.parametrize("family", ["dinov2", "mae"])
@pytest.mark.parametrize("deep", [False, True])
def test_prompts_keep_output_shapes_and_receive_gradients(family, deep, build, inputs):
    model = build(family)
    base = build(family)
    apply_adapters(model, {"method": "vpt", "num_tokens": 3, "deep": deep})
    prompts = model.vit.vpt_prompts.tokens
    assert prompts.shape == (2 if deep else 1, 3, model.embed_dim)
    x = inputs(family)
    out, ref = model(x, layers=[0, 1]), base(x, layers=[0, 1])
    assert out.features.shape == ref.features.shape and out.cls_token.shape == ref.cls_token.shape
    assert [t.shape for t in out.intermediates] == [t.shape for t in ref.intermediates]
    # VPT does not reproduce the base model: the prompts take part in attention from the first block on
    assert not torch.allclose(out.features, ref.features, atol=1e-6)
    out.features.pow(2).mean().backward()
    assert prompts.grad is not None and torch.all(prompts.grad.flatten(1).abs().amax(1) > 0)


def test_deep_prompts_replace_shallow_carry(build, inputs):
    """Deep: block 1's prompts are its own set, so block 0's prompt set cannot reach block 1's output tokens."""
    x = inputs("mae")
    model = build("mae")
    apply_adapters(model, {"method": "vpt", "num_tokens": 2, "deep": True})
    out = model(x, layers=[0])
    # the grid tokens after block 0 depend on set 0 only; the final ones on both sets
    grad0 = torch.autograd.grad(out.intermediates[0].sum(), model.vit.vpt_prompts.tokens, retain_graph=True)[0]
    assert grad0[0].abs().max() > 0 and grad0[1].abs().max() == 0
    grad = torch.autograd.grad(out.features.sum(), model.vit.vpt_prompts.tokens)[0]
    assert grad[1].abs().max() > 0


@pytest.mark.parametrize("family", ["sam", "tinyvit"])
def test_windowed_backbones_are_rejected_with_the_supported_names(family, build):
    with pytest.raises(ConfigError, match=r"supports the token-sequence ViTs dinov2_\*, mae_\*"):
        apply_adapters(build(family), {"method": "vpt"})
