"""Classifiers: every pooling, 2-D and 3-D (slice aggregation, adapter3d across slices), MONAI CNN baselines."""

from __future__ import annotations

import pytest
import torch

from medseg.adapters import AdapterConfig, volume_depth
from medseg.errors import ConfigError, InputShapeError
from medseg.models.classifier import build_classifier, build_cnn_classifier

DINO = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 28}


def _dino(**kwargs):
    torch.manual_seed(0)
    return build_classifier("dinov2_vits14", False, None, 3, 1, arch=DINO, img_size=28, **kwargs).eval()


@pytest.mark.parametrize("pooling", ["cls", "mean", "attention"])
def test_poolings_give_probabilities(pooling):
    model = _dino(pooling=pooling)
    probs = model.probabilities(torch.rand(2, 1, 28, 28))
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))
    assert model.features_are_fixed == (pooling != "attention")


def test_cls_pooling_needs_a_class_token():
    torch.manual_seed(0)
    arch = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}
    model = build_classifier("sam_vit_b", False, None, 2, 1, arch=arch, img_size=32, pooling="cls")
    with pytest.raises(ConfigError, match="class token"):
        model(torch.rand(1, 1, 32, 32))


def test_multilabel_uses_sigmoid():
    model = _dino(label_kind="multilabel")
    logits = model(torch.rand(2, 1, 28, 28))
    assert torch.allclose(model.activate(logits), torch.sigmoid(logits))


def test_volume_embedding_is_the_mean_of_its_slice_embeddings():
    model = _dino(spatial_dims=3)
    volume = torch.rand(2, 1, 28, 28, 4)
    flat = volume.permute(0, 4, 1, 2, 3).reshape(8, 1, 28, 28)
    model2d = _dino()
    model2d.load_state_dict(model.state_dict())
    slices = model2d.embed(flat).reshape(2, 4, -1)
    torch.testing.assert_close(model.embed(volume), slices.mean(1), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputShapeError, match="spatial_dims"):
        model(torch.rand(2, 1, 28, 28))


def test_adapter3d_sees_across_slices_and_attention_aggregates():
    adapter = AdapterConfig(method="adapter3d", bottleneck=8)
    model = _dino(spatial_dims=3, adapter=adapter, aggregation="attention")
    for name, param in model.backbone.named_parameters():
        if name.endswith("adapter3d.up.weight"):
            torch.nn.init.normal_(param, std=0.5)  # zero-initialised: make the adapter act
    volume = torch.rand(1, 1, 28, 28, 3)
    changed = volume.clone()
    changed[..., 2] = torch.rand(1, 1, 28, 28)
    # slice 0's pixels are equal in both volumes; its features differ only through the 3-D convolution across slices
    with torch.no_grad():
        model.embed(volume)
        weights = model.aggregate.attention.last_weights
        depth = model.backbone.vit.blocks[0].adapter3d
        first = model._encode_slices(volume.permute(0, 4, 1, 2, 3).reshape(3, 1, 28, 28))
    with torch.no_grad(), volume_depth(model.backbone, 3):
        a = model._encode_slices(volume.permute(0, 4, 1, 2, 3).reshape(3, 1, 28, 28))[0]
        b = model._encode_slices(changed.permute(0, 4, 1, 2, 3).reshape(3, 1, 28, 28))[0]
    assert depth is not None and not torch.allclose(a, b)  # across slices with depth 3
    assert torch.allclose(first[0], model._encode_slices(volume[..., 0])[0], atol=1e-5)  # depth 1: slices alone
    assert weights.shape == (1, 3) and torch.allclose(weights.sum(), torch.tensor(1.0))
    groups = {g["name"] for g in model.param_groups(lr=1e-3)}
    assert any(n.startswith("adapters") for n in groups) and any(n.startswith("head") for n in groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("adapter3d" in n or not n.startswith("backbone") for n in trainable)


@pytest.mark.parametrize(("name", "dims"), [("densenet121", 2), ("resnet18", 3)])
def test_cnn_baselines(name, dims):
    model = build_cnn_classifier(name, 4, 1, "multiclass", dims)
    x = torch.rand(2, 1, *([32] * dims))
    assert model(x).shape == (2, 4) and model.embed(x).shape == (2, model.embed_dim)
    frozen = build_cnn_classifier(name, 4, 1, "multiclass", dims, adapter=AdapterConfig(method="frozen"))
    assert not any(p.requires_grad for p in frozen.net.parameters())
    with pytest.raises(ConfigError, match="ViT backbones only"):
        build_cnn_classifier(name, 4, 1, "multiclass", dims, adapter=AdapterConfig(method="lora"))
