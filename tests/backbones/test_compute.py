"""Activation checkpointing settings and the frozen prefix (issue 18), on the tiny SAM encoder."""

from __future__ import annotations

import pytest
import torch

import medseg.backbones.compute as compute
from medseg.backbones import create_backbone
from medseg.backbones.compute import checkpoint_interval, frozen_prefix_blocks
from medseg.errors import ConfigError

TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1, 3)}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny models: one thread (see tests/conftest.py)."""


def tiny_sam(**kwargs):
    torch.manual_seed(0)
    model = create_backbone("sam_vit_b", pretrained=False, arch=TINY, img_size=64, **kwargs)
    with torch.no_grad():  # zero-initialised position tables would make the blocks look alike
        for name, param in model.named_parameters():
            if "rel_pos" in name:
                param.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize(
    ("spec", "every"), [(None, 0), (False, 0), ("none", 0), (0, 0), (True, 1), ("all", 1), (1, 1), (3, 3), ("2", 2)]
)
def test_checkpoint_interval_reads_every_spelling(spec, every):
    assert checkpoint_interval(spec) == every


@pytest.mark.parametrize("spec", ["often", -1, "2.5", 1.5])
def test_bad_checkpointing_values_are_config_errors(spec):
    with pytest.raises(ConfigError, match="activation_checkpointing must be none, all, or a positive integer"):
        checkpoint_interval(spec)


def test_an_interval_beyond_the_blocks_is_refused():
    with pytest.raises(ConfigError, match="larger than the 4 blocks of 'sam_vit_b'"):
        tiny_sam(activation_checkpointing=5)


@pytest.mark.parametrize(("spec", "calls"), [("all", 4), (2, 2), (3, 2)])
def test_sam_checkpointing_gives_the_same_loss_and_gradients(monkeypatch, spec, calls):
    """Issue 18: SAM refused gradient checkpointing; now any interval trains to the same numbers."""
    counted = []
    original = compute.activation_checkpoint
    monkeypatch.setattr(compute, "activation_checkpoint", lambda *a, **k: counted.append(1) or original(*a, **k))
    x = torch.rand(2, 1, 64, 64) * 255
    results = []
    for setting in ("none", spec):
        model = tiny_sam(activation_checkpointing=setting).train()
        out = model(x, layers=(0,))
        loss = out.features.square().mean() + out.intermediates[0].mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert len(counted) == calls  # blocks 0, k, 2k, ... were recomputed
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_only_acts_when_training_with_gradients(monkeypatch):
    counted = []
    monkeypatch.setattr(compute, "activation_checkpoint", lambda *a, **k: counted.append(1))
    model = tiny_sam(activation_checkpointing="all").eval()
    model(torch.rand(1, 1, 64, 64))
    with torch.no_grad():
        model.train()(torch.rand(1, 1, 64, 64))
    assert counted == []


def test_frozen_prefix_ends_at_the_first_trainable_block():
    model = tiny_sam()
    blocks, heads = model.compute_blocks()
    for param in model.parameters():
        param.requires_grad_(False)
    assert frozen_prefix_blocks(model, blocks, heads) == 4  # nothing trains in the blocks
    model.image_encoder.neck[0].weight.requires_grad_(True)
    assert frozen_prefix_blocks(model, blocks, heads) == 4  # the neck runs after the blocks
    model.image_encoder.blocks[2].mlp.lin1.weight.requires_grad_(True)
    assert frozen_prefix_blocks(model, blocks, heads) == 2
    model.image_encoder.pos_embed.requires_grad_(True)  # in front of every block: no prefix
    assert frozen_prefix_blocks(model, blocks, heads) == 0


def test_frozen_prefix_runs_without_gradients_and_keeps_the_gradients_above():
    model = tiny_sam().train()
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.image_encoder.blocks[3].parameters():
        param.requires_grad_(True)
    seen = {}

    def record(index):
        def hook(module, args, out):
            seen[index] = (torch.is_grad_enabled(), out)

        return hook

    for index, block in enumerate(model.image_encoder.blocks):
        block.register_forward_hook(record(index))
    out = model(torch.rand(1, 1, 64, 64) * 255)
    assert [seen[i][0] for i in range(4)] == [False, False, False, True]
    assert not seen[2][1].requires_grad and seen[3][1].requires_grad
    out.features.sum().backward()
    assert all(p.grad is not None for p in model.image_encoder.blocks[3].parameters())


def test_a_trainable_embedding_hooked_onto_the_stem_still_gets_its_gradient():
    """The volumetric model adds its (trainable) depth embedding to the patch tokens through a hook: with frozen
    early blocks, those blocks must still carry its gradient (a no_grad prefix would silently cut it off)."""
    model = tiny_sam().train()
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.image_encoder.blocks[3].parameters():
        param.requires_grad_(True)
    embedding = torch.nn.Parameter(torch.zeros(TINY["embed_dim"]))
    model.image_encoder.patch_embed.register_forward_hook(lambda module, args, out: out + embedding)
    model(torch.rand(1, 1, 64, 64) * 255).features.square().mean().backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
