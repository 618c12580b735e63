"""Every backbone family x adapter x ViT decoder in the configs takes a real optimisation step.

Composed from `conf/train.yaml` as `medseg train` would, with tiny architectures so the whole matrix runs on CPU.
Combinations that cannot work are not skipped: VPT on windowed encoders and the SAM mask decoder on DINOv2/MAE must
fail with their documented errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medseg.config import CONFIG_DIR, instantiate
from medseg.errors import ConfigError

ADAPTERS = sorted(p.stem for p in (Path(CONFIG_DIR) / "adapter").glob("*.yaml"))
DECODERS = ["vit_linear", "vit_unetr", "sam_mask"]
BACKBONES = {
    "sam_vit_b": [
        "backbone=sam_vit_b", "backbone.img_size=64",
        "+model.arch={depth:2,embed_dim:32,num_heads:2,global_attn_indexes:[1]}",
    ],
    "mae_vit_base": [
        "backbone=mae_vit_base", "+backbone.img_size=64", "+model.arch={depth:2,embed_dim:32,num_heads:2,img_size:64}",
    ],
    "dinov2_vits14_reg": [
        "backbone=dinov2_vits14_reg", "+backbone.img_size=56",
        "+model.arch={depth:2,embed_dim:32,num_heads:2,img_size:56}",
    ],
}  # fmt: skip
WINDOWED = {"sam_vit_b"}  # no place for VPT's prompt tokens
SAM_FAMILY = {"sam_vit_b"}  # sam_mask reuses SAM's mask decoder and 256-channel embedding


def _batch(size: int) -> dict[str, torch.Tensor]:
    image = torch.rand(2, 1, size, size)
    label = torch.zeros(2, 1, size, size)
    label[:, :, size // 4 : size // 2, size // 4 : size // 2] = 1
    label[:, :, size // 2 :, size // 2 :] = 2
    return {"image": image, "label": label}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_combination_trains_one_step(backbone, adapter, decoder, compose_config, tmp_path):
    overrides = [
        "data=mni_tissue", f"model={decoder}", f"adapter={adapter}", "init=scratch", *BACKBONES[backbone],
    ]  # fmt: skip
    if decoder == "vit_unetr":
        overrides.append("model.feature_size=4")
    cfg = compose_config(overrides, tmp_path)
    if adapter.startswith("vpt") and backbone in WINDOWED:
        with pytest.raises(ConfigError, match="dinov2|mae"):
            instantiate(cfg.model, num_classes=3, in_channels=1)
        return
    if decoder == "sam_mask" and backbone not in SAM_FAMILY:
        with pytest.raises(ConfigError, match="needs a SAM-family backbone"):
            instantiate(cfg.model, num_classes=3, in_channels=1)
        return
    model = instantiate(cfg.model, num_classes=3, in_channels=1)
    task = instantiate(cfg.task, model=model, label_names={"background": 0, "a": 1, "b": 2})
    optimizer = task.optimizer_factory(params=task.parameter_groups())
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    size = int(cfg.backbone.img_size)
    loss = task.loss(model(_batch(size)["image"]), _batch(size)["label"])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert changed, "no trainable parameter moved"
    frozen_changed = [
        n
        for n, p in model.named_parameters()
        if not p.requires_grad and n in trainable and not torch.equal(p, trainable[n])
    ]
    assert not frozen_changed
