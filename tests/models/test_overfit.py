"""A tiny ViT segmenter and a tiny baseline each overfit one synthetic batch: the whole training path learns."""

from __future__ import annotations

import torch

from medseg.models import build_baseline


def _batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images in [0, 1] with a bright disc (class 1) and a dark square (class 2) on noise."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    label = torch.zeros(2, size, size, dtype=torch.long)
    for b, (cy, cx) in enumerate([(size // 3, size // 2), (size // 2, size // 3)]):
        label[b][(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2] = 1
        label[b, size - size // 3 :, size - size // 3 :] = 2
    intensity = torch.tensor([0.5, 0.9, 0.1])[label]
    image = (intensity + 0.05 * torch.randn(2, size, size, generator=generator)).clamp(0, 1)
    return image.unsqueeze(1), label


def _fit(model: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, lr: float, steps: int = 30) -> list[float]:
    optimizer = torch.optim.AdamW(model.param_groups(lr=lr, backbone_lr_scale=0.1))
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(image), label)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tiny_vit_unetr_overfits_one_batch(tiny_segmenter):
    image, label = _batch(32)
    model = tiny_segmenter("mae_vit_base", "unetr", num_classes=3, img_size=32, feature_size=4)
    losses = _fit(model, image, label, lr=3e-3)
    assert losses[-1] < 0.4 * losses[0], losses


def test_tiny_unet_overfits_one_batch():
    image, label = _batch(32)
    torch.manual_seed(0)
    model = build_baseline("unet", 2, 1, 3, [32, 32], channels=(4, 8), strides=(2,), num_res_units=1)
    losses = _fit(model, image, label, lr=1e-2)
    assert losses[-1] < 0.4 * losses[0], losses
