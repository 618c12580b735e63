"""The shared timm-ViT wrapper: position-embedding resampling rules, checkpoint family hints, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from medseg.backbones.base import InputSpec
from medseg.backbones.vit import (
    PosEmbedResize,
    TimmViTBackbone,
    build_timm_vit,
    guess_checkpoint_family,
    resize_pos_embed,
)
from medseg.errors import InputShapeError, MedsegError

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}


def test_exact_size_rule_is_timms_resampling_without_antialias():
    pos = torch.randn(1, 4 * 4, 8)
    for grid in ((3, 3), (6, 5), (2, 7)):
        ours = resize_pos_embed(pos, (4, 4), grid, PosEmbedResize(antialias=False))
        timms = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[4, 4], num_prefix_tokens=0, antialias=False)
        assert ours.shape == (1, grid[0] * grid[1], 8)
        assert torch.allclose(ours, timms, atol=1e-6), grid


def test_offset_rule_samples_elsewhere_and_same_grid_is_untouched():
    pos = torch.randn(1, 4 * 4, 8)
    exact = resize_pos_embed(pos, (4, 4), (6, 5), PosEmbedResize())
    offset = resize_pos_embed(pos, (4, 4), (6, 5), PosEmbedResize(offset=0.1))
    assert offset.shape == exact.shape and (offset - exact).abs().max() > 1e-3
    assert resize_pos_embed(pos, (4, 4), (4, 4), PosEmbedResize(offset=0.1)) is pos


def test_resampling_keeps_the_dtype():
    pos = torch.randn(1, 9, 8, dtype=torch.bfloat16)
    assert resize_pos_embed(pos, (3, 3), (5, 5), PosEmbedResize(offset=0.1)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        ({"cls_token", "pos_embed", "register_tokens", "blocks.0.ls1.gamma"}, "DINOv2"),
        ({"cls_token", "pos_embed", "blocks.0.mlp.w12.weight"}, "DINOv2"),
        ({"cls_token", "pos_embed", "blocks.0.norm1.weight", "decoder_embed.weight"}, "MAE"),
        ({"image_encoder.pos_embed", "prompt_encoder.pe_layer.x"}, "SAM"),
        ({"cls_token", "pos_embed", "blocks.0.norm1.weight"}, "plain ViT"),
        ({"conv1.weight"}, None),
    ],
)
def test_checkpoint_family_hint(keys, family):
    guess = guess_checkpoint_family(dict.fromkeys(keys, torch.zeros(1)))
    assert guess is None if family is None else family in guess


def backbone(**kwargs) -> TimmViTBackbone:
    vit = build_timm_vit("vit_base_patch16_224", img_size=64, arch=TINY)
    return TimmViTBackbone(vit, InputSpec(image_size=64), PosEmbedResize(), **kwargs)


def test_gradient_checkpointing_changes_memory_not_results(monkeypatch):
    import medseg.backbones.compute as compute

    calls = []
    checkpoint = compute.activation_checkpoint
    monkeypatch.setattr(compute, "activation_checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    torch.manual_seed(0)
    model = backbone().train()
    x = torch.randn(2, 1, 48, 64)
    plain = model(x, layers=[0]).features
    plain.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    checked = model(x, layers=[0]).features
    checked.square().mean().backward()
    assert len(calls) == TINY["depth"]
    assert torch.allclose(plain, checked)
    for a, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_input_and_spec_errors_are_user_errors():
    assert issubclass(InputShapeError, MedsegError)
    with pytest.raises(InputShapeError, match="64x50"):
        backbone()(torch.randn(1, 1, 64, 50))
    vit = build_timm_vit("vit_base_patch16_224", img_size=64, arch=TINY)
    with pytest.raises(InputShapeError, match="image_size 70"):
        TimmViTBackbone(vit, InputSpec(image_size=70), PosEmbedResize())
    no_cls = build_timm_vit("vit_base_patch16_224", img_size=64, arch={**TINY, "class_token": False})
    with pytest.raises(ValueError, match="class token"):
        TimmViTBackbone(no_cls, InputSpec(image_size=64), PosEmbedResize())
