"""The feature cache answers repeated requests without the encoder and never returns a stale feature."""

from __future__ import annotations

import pytest
import torch

from medseg.backbones import create_backbone
from medseg.errors import ConfigError
from medseg.models.classifier import Classifier
from medseg.workflows.classification.features import FeatureCache


def _model(pooling: str = "mean") -> Classifier:
    torch.manual_seed(0)
    net = create_backbone(
        "mae_vit_base", pretrained=False, arch={"depth": 1, "embed_dim": 16, "num_heads": 2, "img_size": 32}
    )
    return Classifier(net, 3, 1, pooling=pooling, img_size=32).eval()


def _batches(images: torch.Tensor) -> list[dict]:
    return [{"image": images[:3], "case_id": ["a", "b", "c"]}, {"image": images[3:], "case_id": ["d"]}]


def test_reused_in_memory_and_from_disk_and_invalidated(tmp_path):
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    model = _model()
    cache = FeatureCache(tmp_path)
    ids, first = cache.features(model, _batches(images), "prep-1")
    assert ids == ["a", "b", "c", "d"] and first.shape == (4, 16) and (cache.hits, cache.misses) == (0, 4)
    _, again = cache.features(model, _batches(images), "prep-1")
    assert (cache.hits, cache.misses) == (4, 4) and torch.equal(first, again)

    fresh = FeatureCache(tmp_path)  # another process: the files answer
    _, from_disk = fresh.features(model, _batches(images), "prep-1")
    assert (fresh.hits, fresh.misses) == (4, 0) and torch.equal(first, from_disk)

    fresh.features(model, _batches(images), "prep-2")  # other preprocessing
    assert fresh.misses == 4
    changed = images.clone()
    changed[1] += 0.01  # one image changed: one miss
    fresh.features(model, _batches(changed), "prep-1")
    assert fresh.misses == 5
    with torch.no_grad():
        model.backbone.vit.blocks[0].mlp.fc1.weight.mul_(1.5)  # weights changed in place (a training step)
    _, updated = fresh.features(model, _batches(images), "prep-1")
    assert fresh.misses == 9 and not torch.allclose(updated, first)
    head_only = _model()
    head_only.head.weight.data.zero_()  # the head is not part of the key: features stay valid
    fresh.features(head_only, _batches(images), "prep-1")
    assert fresh.misses == 9


def test_learned_pooling_cannot_be_cached(tmp_path):
    with pytest.raises(ConfigError, match="parameter-free pooling"):
        FeatureCache(tmp_path).features(_model("attention"), _batches(torch.rand(4, 1, 32, 32)), "p")
