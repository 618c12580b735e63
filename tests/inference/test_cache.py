"""EmbeddingCache: a second prompt skips the encoder; a changed image, weights or preprocessing never hits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.inference.cache import EmbeddingCache, embedding_key, weights_hash
from medseg.inference.recipe import SliceRecipe, predict_slice, segment_slice
from medseg.models.promptable import build_promptable

TINY_SAM = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_promptable("sam_vit_b", pretrained=False, img_size=64, arch=TINY_SAM).eval()


class CountingEncoder:
    """Counts the calls of a model's ``encode`` (the expensive path the cache must skip)."""

    def __init__(self, model) -> None:
        self.calls = 0
        original = model.encode

        def encode(images):
            self.calls += 1
            return original(images)

        model.encode = encode


@pytest.fixture
def image():
    return np.random.default_rng(0).uniform(0, 255, (50, 40)).astype(np.float32)


def test_second_prompt_on_same_slice_skips_the_encoder(image):
    model, cache = tiny_model(), EmbeddingCache()
    counter = CountingEncoder(model)
    first = predict_slice(model, image, box=(5, 5, 30, 30), cache=cache)
    second = predict_slice(model, image, box=(10, 2, 40, 20), points=[(20, 10)], cache=cache)
    assert counter.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    uncached = predict_slice(model, image, box=(10, 2, 40, 20), points=[(20, 10)])
    assert counter.calls == 2
    assert torch.equal(second.logits, uncached.logits)
    assert not torch.equal(first.logits, second.logits)


def test_changed_image_weights_or_preprocessing_miss(image):
    model, cache = tiny_model(), EmbeddingCache()
    counter = CountingEncoder(model)
    box = (5, 5, 30, 30)
    base = predict_slice(model, image, box=box, cache=cache)
    changed = image.copy()
    changed[3, 4] += 1.0
    predict_slice(model, changed, box=box, cache=cache)
    assert counter.calls == 2, "a one-pixel change must not hit"
    predict_slice(model, image.astype(np.float64), box=box, cache=cache)
    assert counter.calls == 3, "the same values in another dtype are another image"
    predict_slice(model, image, box=box, recipe=SliceRecipe("ct", window=(100.0, 200.0)), cache=cache)
    predict_slice(model, image, box=box, recipe=SliceRecipe("ct", window=(100.0, 100.0)), cache=cache)
    assert counter.calls == 5, "another preprocessing must not hit"
    with torch.no_grad():
        model.backbone.image_encoder.patch_embed.proj.weight.mul_(1.5)  # in place, as an optimizer step
    after = predict_slice(model, image, box=box, cache=cache)
    assert counter.calls == 6, "changed weights must not hit"
    assert not torch.equal(after.logits, base.logits)
    predict_slice(model, image, box=box, cache=cache)
    assert counter.calls == 6 and cache.hits == 1


def test_weights_hash_tracks_every_change():
    a, b = tiny_model(0), tiny_model(0)
    assert weights_hash(a) == weights_hash(b)
    first = weights_hash(a)
    assert weights_hash(a) == first
    b.load_state_dict(tiny_model(1).state_dict())
    assert weights_hash(b) != first
    optimizer = torch.optim.SGD(a.backbone.parameters(), lr=0.1)
    a.encode(torch.rand(1, 1, 64, 64)).sum().backward()
    optimizer.step()
    assert weights_hash(a) != first
    c = tiny_model(0)
    with torch.no_grad():
        c.mask_decoder.iou_token.weight.add_(1.0)
    assert weights_hash(c) == first, "the decoder does not change an embedding, so it is not hashed"


def test_key_combines_image_weights_and_preprocessing(image):
    key = embedding_key(image, "w", "p")
    assert key == embedding_key(image.copy(), "w", "p")
    assert (
        len({key, embedding_key(image, "w2", "p"), embedding_key(image, "w", "p2"), embedding_key(image.T, "w", "p")})
        == 4
    )


def test_lru_eviction_by_count_and_bytes():
    cache = EmbeddingCache(max_items=2)
    for name in "abc":
        cache.put(name, torch.zeros(4))
    assert cache.get("a") is None and cache.get("b") is not None and len(cache) == 2
    cache.put("d", torch.zeros(4))  # "b" was used more recently than "c"
    assert cache.get("c") is None and cache.get("b") is not None
    small = EmbeddingCache(max_bytes=3 * 16)
    for name in "abcd":
        small.put(name, torch.zeros(4))  # 16 bytes each
    assert len(small) == 3 and small.nbytes == 48 and small.get("a") is None


def test_disk_cache_survives_the_process_and_checks_its_key(image, tmp_path):
    model = tiny_model()
    counter = CountingEncoder(model)
    mask = segment_slice(model, image, box=(5, 5, 30, 30), cache=EmbeddingCache(folder=tmp_path))
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and counter.calls == 1
    fresh = EmbeddingCache(folder=tmp_path)
    again = segment_slice(model, image, box=(5, 5, 30, 30), cache=fresh)
    assert counter.calls == 1 and fresh.hits == 1 and np.array_equal(mask, again)
    renamed = tmp_path / ("0" * 64 + ".safetensors")
    files[0].rename(renamed)  # a file whose name is not the key it was written for is never trusted
    assert EmbeddingCache(folder=tmp_path).get("0" * 64) is None


def test_an_unreadable_disk_entry_is_a_miss_and_is_replaced(tmp_path):
    key = "ab" * 32
    (tmp_path / f"{key}.safetensors").write_bytes(b"\x00\x01 not safetensors")  # cut short by hand, or foreign
    cache = EmbeddingCache(folder=tmp_path)
    assert cache.get(key) is None
    cache.put(key, torch.ones(1, 2))
    assert torch.equal(EmbeddingCache(folder=tmp_path).get(key), torch.ones(1, 2))
