"""The CUDA paths of issue 18: fused attention and activation checkpointing on a GPU (``pytest -m gpu``).

CI deselects the ``gpu`` marker; ``tools/gpu_check.sh`` runs these on a machine with a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from medseg.backbones import create_backbone

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Windowed and global blocks, a 32 x 32 token grid (14 x 14 windows with padding), width 64.
ARCH = {"depth": 4, "embed_dim": 64, "num_heads": 4, "global_attn_indexes": (1, 3)}
SIZE = 512


def tiny_sam(attention: str, **kwargs):
    torch.manual_seed(0)
    model = create_backbone("sam_vit_b", pretrained=False, arch=ARCH, img_size=SIZE, attention=attention, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name:
                param.normal_(0.0, 0.5)
    return model.cuda()


def test_fused_sam_attention_matches_the_reference_on_cuda_fp32_and_bf16():
    fused, reference = tiny_sam("fused").eval(), tiny_sam("reference").eval()
    x = torch.rand(2, 1, SIZE, SIZE, device="cuda") * 255
    with torch.no_grad():
        a, b = fused(x).features, reference(x).features
        assert (a - b).abs().max().item() <= 1e-4
        with torch.autocast("cuda", dtype=torch.bfloat16):
            c = fused(x).features.float()
    assert (c - b).abs().max().item() <= 0.05 * b.abs().max().item()


def test_the_memory_efficient_kernel_takes_the_relative_position_mask_forward_and_backward():
    """SDPA must not fall back to the math path: force the memory-efficient kernel (it raises if it cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_sam("fused").train()
    x = torch.rand(2, 1, SIZE, SIZE, device="cuda") * 255
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).features.float().square().mean()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "rel_pos" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_fused_attention_lowers_peak_training_memory_on_cuda():
    peaks = {}
    for attention in ("reference", "fused"):
        model = tiny_sam(attention).train()
        x = torch.rand(2, 1, SIZE, SIZE, device="cuda") * 255
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x).features.float().square().mean().backward()
        torch.cuda.synchronize()
        peaks[attention] = torch.cuda.max_memory_allocated()
        del model
        torch.cuda.empty_cache()
    assert peaks["fused"] < peaks["reference"], peaks


@pytest.mark.parametrize("family", ["sam", "litemedsam"])
def test_activation_checkpointing_keeps_gradients_and_lowers_peak_memory_on_cuda(family):
    results = {}
    for setting in ("none", "all"):
        torch.manual_seed(0)
        if family == "sam":
            model = tiny_sam("fused", activation_checkpointing=setting)
            x = torch.rand(2, 1, SIZE, SIZE, device="cuda") * 255
        else:
            model = create_backbone("litemedsam", activation_checkpointing=setting).cuda()
            x = torch.rand(2, 1, 256, 256, device="cuda")
        model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = model(x).features.square().mean()
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[setting] = (loss.detach(), grads, torch.cuda.max_memory_allocated())
        del model
        torch.cuda.empty_cache()
    (loss_a, grads_a, peak_a), (loss_b, grads_b, peak_b) = results["none"], results["all"]
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-4, rtol=1e-3, msg=name)
    assert peak_b < peak_a
