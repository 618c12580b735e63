"""param_groups: layer-wise LR decay, adapter and decoder rates, each trainable parameter exactly once."""

from __future__ import annotations

import pytest
import torch

from medseg.errors import ConfigError
from medseg.models import backbone_layer_ids


def _lr_of(groups: list[dict]) -> dict[str, float]:
    return {f"{g['name'].split('.')[0]}:{n}": g["lr"] for g in groups for n in g["param_names"]}


def _check_partition(model, groups: list[dict]) -> None:
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == trainable, "groups must hold exactly the trainable parameters"


def test_layer_wise_decay_on_a_tiny_vit(tiny_segmenter):
    model = tiny_segmenter("dinov2_vits14", "linear")  # 4 blocks
    groups = model.param_groups(lr=1.0, backbone_lr_scale=0.1, layer_decay=0.5, weight_decay=0.05)
    _check_partition(model, groups)
    lr = _lr_of(groups)
    for i in range(4):
        assert lr[f"backbone:vit.blocks.{i}.attn.qkv.weight"] == pytest.approx(0.1 * 0.5 ** (4 - i))
    for name in ("vit.patch_embed.proj.weight", "vit.pos_embed", "vit.cls_token"):
        assert lr[f"backbone:{name}"] == pytest.approx(0.1 * 0.5**5)
    assert lr["backbone:vit.norm.weight"] == pytest.approx(0.1)
    assert lr["decoder:classifier.weight"] == 1.0
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert decay["vit.blocks.0.attn.qkv.weight"] == 0.05 and decay["classifier.weight"] == 0.05
    assert decay["vit.blocks.0.attn.qkv.bias"] == decay["vit.pos_embed"] == decay["norm.weight"] == 0.0


def test_without_decay_the_backbone_has_one_scaled_rate(tiny_segmenter):
    model = tiny_segmenter("sam_vit_b", "unetr")
    groups = model.param_groups(lr=2e-4, backbone_lr_scale=0.5)
    _check_partition(model, groups)
    rates = {g["name"].split(".")[0]: g["lr"] for g in groups}
    assert rates == {"backbone": pytest.approx(1e-4), "decoder": pytest.approx(2e-4)}


def test_sam_layer_ids_follow_the_blocks(tiny_segmenter):
    model = tiny_segmenter("sam_vit_b", "linear")
    ids = backbone_layer_ids(model.backbone)
    assert ids["image_encoder.pos_embed"] == ids["image_encoder.patch_embed.proj.weight"] == 0
    assert ids["image_encoder.blocks.2.mlp.lin1.weight"] == 3
    assert ids["image_encoder.neck.0.weight"] == 5  # after the last of 4 blocks: no decay


def test_frozen_parameters_are_absent_and_adapters_train_at_the_base_rate(tiny_segmenter):
    adapter = {"method": "lora", "rank": 2, "targets": ["qkv"]}
    model = tiny_segmenter("mae_vit_base", "linear", adapter=adapter)
    groups = model.param_groups(lr=1e-3, backbone_lr_scale=0.1, layer_decay=0.75)
    _check_partition(model, groups)
    names = {g["name"].split(".")[0] for g in groups}
    assert names == {"adapters", "decoder"}  # the pretrained backbone is frozen: no backbone group
    adapter_lrs = {g["lr"] for g in groups if g["name"].startswith("adapters")}
    assert adapter_lrs == {1e-3}
    report = model.trainable_report()["groups"]
    assert report["adapters"]["trainable"] > 0 and report["backbone"]["trainable"] == 0


def test_bitfit_biases_are_adapter_parameters(tiny_segmenter):
    model = tiny_segmenter("sam_vit_b", "linear", adapter={"method": "bitfit"})
    groups = model.param_groups(lr=1e-3)
    _check_partition(model, groups)
    adapters = [n for g in groups if g["name"].startswith("adapters") for n in g["param_names"]]
    assert adapters and all(n.endswith("bias") for n in adapters)


def test_invalid_layer_decay_is_a_config_error(tiny_segmenter):
    model = tiny_segmenter("sam_vit_b", "linear")
    with pytest.raises(ConfigError, match="layer_decay"):
        model.param_groups(lr=1.0, layer_decay=1.5)


def test_groups_drive_a_torch_optimizer(tiny_segmenter):
    model = tiny_segmenter("dinov2_vits14", "linear")
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-3, layer_decay=0.9, weight_decay=0.01))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(1 for _ in model.parameters())
