"""Frozen-backbone features computed once per case and reused by every kNN and linear-probe run that can use them.

A cached feature is valid only for the exact image, weights and preprocessing that produced it, so the key is
:func:`medseg.inference.cache.embedding_key` over

* the image: the digest of the preprocessed model input (the data pipeline's output, so the raw file *and* every
  deterministic transform are covered);
* the weights: :func:`medseg.inference.cache.weights_hash` of the modules ``embed`` uses (``encoder_modules()``:
  backbone and pooling, not the head), so a fine-tuned, adapted or scratch twin backbone gets other keys;
* the preprocessing: the data module's transform signature plus the model's ``feature_signature()`` (pooling,
  slice aggregation, working size, input range).

Entries live in memory and, with a folder, as ``<key>.safetensors`` files whose metadata repeats the key
(:class:`~medseg.inference.cache.EmbeddingCache`), so they outlive the process and are shared across runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.inference.cache import EmbeddingCache, embedding_key, weights_hash

__all__ = ["FeatureCache"]


class FeatureCache:
    """Per-case embeddings of frozen models, in memory and optionally on disk.

    Args:
        folder: folder of ``<key>.safetensors`` files (``None``: memory only).
        max_items: most embeddings kept in memory.

    Attributes:
        hits, misses: cases answered from the cache, and cases that needed the encoder.
        seconds: wall time spent in the encoder (s).
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None, max_items: int = 1_000_000) -> None:
        self.store = EmbeddingCache(max_items=max_items, max_bytes=1 << 34, folder=Path(folder) if folder else None)
        self.hits = self.misses = 0
        self.seconds = 0.0

    def features(
        self, model: nn.Module, batches: Iterable[Mapping[str, Any]], preprocessing: str
    ) -> tuple[list[str], torch.Tensor]:
        """Embeddings ``(N, E)`` (float32, CPU) of every case in ``batches``, in order, with their case ids.

        Args:
            model: a classifier with ``embed``, ``encoder_modules`` and ``feature_signature`` whose features are
                fixed (no learned pooling).
            batches: dicts with ``image`` ``(B, C, ...)`` and ``case_id`` (a list), e.g. an evaluation dataloader.
            preprocessing: the data pipeline's signature (``ClassificationDataModule.preprocessing_signature()``).
        """
        if not getattr(model, "features_are_fixed", False):
            raise ConfigError(
                "cached features need a parameter-free pooling: the kNN and linear protocols use model.pooling=mean "
                "(or cls) and model.aggregation=mean; attention pooling trains with the peft/full protocols."
            )
        weights = weights_hash(model)
        signature = f"{preprocessing}|{model.feature_signature()}"
        device = next(iter(model.parameters())).device
        ids: list[str] = []
        vectors: list[torch.Tensor] = []
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                images = batch["image"]
                keys = [embedding_key(image, weights, signature) for image in images]
                found = [self.store.get(key) for key in keys]
                missing = [i for i, f in enumerate(found) if f is None]
                if missing:
                    started = time.perf_counter()
                    with torch.no_grad():
                        computed = model.embed(torch.as_tensor(images[missing]).to(device)).float().cpu()
                    self.seconds += time.perf_counter() - started
                    for i, vector in zip(missing, computed):
                        self.store.put(keys[i], vector.clone())
                        found[i] = vector
                self.misses += len(missing)
                self.hits += len(keys) - len(missing)
                ids += [str(c) for c in batch["case_id"]]
                vectors += [torch.as_tensor(f) for f in found]
        finally:
            model.train(was_training)
        if not vectors:
            raise ConfigError("no cases to compute features for; check the data split.")
        return ids, torch.stack(vectors)

    def stats(self) -> dict[str, Any]:
        """``{"feature_cache_hits", "feature_cache_misses", "feature_seconds"}`` for run summaries."""
        return {"feature_cache_hits": self.hits, "feature_cache_misses": self.misses, "feature_seconds": self.seconds}
