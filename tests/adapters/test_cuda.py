"""Memory-lean PEFT on a GPU (issue 18, ``pytest -m gpu``): a bf16 training step, late LoRA's lower peak."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.adapters import apply_adapters
from medseg.backbones import create_backbone

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ARCH = {"depth": 4, "embed_dim": 128, "num_heads": 4, "global_attn_indexes": (1, 3)}
SIZE = 512


def _adapted(config: dict) -> nn.Module:
    torch.manual_seed(0)
    model = create_backbone("sam_vit_b", pretrained=False, arch=ARCH, img_size=SIZE)
    apply_adapters(model, config)
    return model


def _step(model: nn.Module) -> tuple[float, int, int]:
    """One bf16-mixed training step of the adapted backbone with a 1x1 head: (loss, weight bytes, peak bytes)."""
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    head = nn.Conv2d(model.embed_dim, 1, kernel_size=1)
    model.cuda().train()
    head.cuda()
    weights = torch.cuda.memory_allocated() - before
    params = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-3)
    x = torch.rand(2, 1, SIZE, SIZE, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = head(model(x).features).float().square().mean()
    loss.backward()
    optimiser.step()
    torch.cuda.synchronize()
    return loss.item(), weights, torch.cuda.max_memory_allocated() - before


def test_bf16_frozen_lora_trains_on_cuda_with_half_the_weight_memory():
    fp32 = _adapted({"method": "lora", "rank": 4})
    loss32, weights32, _ = _step(fp32)
    del fp32
    bf16 = _adapted({"method": "lora", "rank": 4, "frozen_dtype": "bf16"})
    lora_before = {n: p.detach().clone() for n, p in bf16.named_parameters() if p.requires_grad}
    loss16, weights16, _ = _step(bf16)
    assert torch.isfinite(torch.tensor(loss16)) and abs(loss16 - loss32) <= 0.05 * abs(loss32) + 1e-3
    assert weights16 < 0.6 * weights32, (weights16, weights32)
    trained = dict(bf16.named_parameters())
    assert all(trained[n].dtype == torch.float32 for n in lora_before)
    assert any(not torch.equal(lora_before[n], trained[n].detach()) for n in lora_before if "lora_B" in n)


def test_late_lora_peaks_below_lora_in_every_block_on_cuda():
    _, _, everywhere = _step(_adapted({"method": "lora", "rank": 4}))
    _, _, late = _step(_adapted({"method": "lora", "rank": 4, "last_k_blocks": 1}))
    assert late < everywhere, (late, everywhere)
