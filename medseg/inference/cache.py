"""Image-embedding cache for interactive segmentation: one encoder pass per slice, however many clicks follow.

As in micro-sam, an embedding is only valid for the exact image, model and preprocessing that produced it, so the key
is a SHA-256 over all three (:func:`embedding_key`):

* the image: its raw bytes, dtype and shape (the slice *before* preprocessing, as the caller holds it);
* the weights: :func:`weights_hash` of the modules the embedding depends on (the backbone and neck of a
  :class:`~medseg.models.promptable.PromptableSegmenter`), over names, dtypes, shapes and bytes of the state dict.
  It is computed once per model and reused while no tensor changed: PyTorch bumps a tensor's version counter on
  every in-place write (optimizer steps, ``load_state_dict``), and a changed counter, storage or tensor object
  triggers a fresh hash;
* the preprocessing: a string naming every choice that changes the model input (recipe, window, size...);
* the numerics: the autocast state of the thread computing the key (:func:`medseg.inference.precision
  .numerics_signature`), since a bfloat16 embedding is not the float32 one. Compute the key in the same thread and
  precision as the embedding.

A changed image, weights, preprocessing or precision therefore gives another key and never a stale embedding.
Entries live in memory (least recently used dropped first, bounded by count and bytes) and optionally in a folder as
``<key>.safetensors`` files, whose metadata repeats the key and is checked on reading, so a renamed, foreign or
unreadable file is ignored (and replaced) rather than trusted.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from medseg.atomic import atomic_path
from medseg.inference.precision import numerics_signature

__all__ = ["EmbeddingCache", "embedding_key", "image_digest", "weights_hash"]

# module -> (fingerprint of its tensors, hash); weak keys, so a new model never inherits a dead one's entry.
_HASHES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def image_digest(image: np.ndarray | torch.Tensor) -> str:
    """SHA-256 of an array's bytes, dtype and shape (C order), e.g. a raw 2-D slice."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _modules(model: nn.Module | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    if isinstance(model, Mapping):
        return dict(model)
    if hasattr(model, "encoder_modules"):
        return dict(model.encoder_modules())
    return {"model": model}


def _tensors(modules: Mapping[str, nn.Module]) -> list[tuple[str, torch.Tensor]]:
    return [
        (f"{prefix}.{name}", t) for prefix, m in modules.items() for name, t in m.state_dict(keep_vars=True).items()
    ]


def weights_hash(model: nn.Module | Mapping[str, nn.Module]) -> str:
    """SHA-256 of the weights an embedding depends on, recomputed only after a tensor changed.

    Args:
        model: a model with ``encoder_modules()`` (only those are hashed), a mapping of modules, or any module.

    Returns:
        Hex digest over every state-dict entry's name, dtype, shape and bytes.
    """
    modules = _modules(model)
    tensors = _tensors(modules)
    try:  # identity, storage and in-place-write counter of every tensor
        fingerprint = tuple((name, id(t), t.data_ptr(), t._version) for name, t in tensors)
    except RuntimeError:  # inference-mode tensors have no version counter: hash every time
        fingerprint = None
    key = model if isinstance(model, nn.Module) else None
    cached = _HASHES.get(key) if key is not None else None
    if fingerprint is not None and cached is not None and cached[0] == fingerprint:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in tensors:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    value = digest.hexdigest()
    if key is not None and fingerprint is not None:
        _HASHES[key] = (fingerprint, value)
    return value


def embedding_key(image: np.ndarray | torch.Tensor, weights: str, preprocessing: str) -> str:
    """Cache key: SHA-256 of the image digest, the weights hash, the preprocessing signature and the precision."""
    numerics = numerics_signature()
    text = f"image={image_digest(image)}|weights={weights}|preprocessing={preprocessing}|numerics={numerics}"
    return hashlib.sha256(text.encode()).hexdigest()


class EmbeddingCache:
    """LRU cache of image embeddings, in memory and optionally on disk.

    Attributes:
        max_items: most embeddings kept in memory.
        max_bytes: most bytes of embeddings kept in memory (LiteMedSAM: 4 MiB per slice in float32).
        folder: optional folder of ``<key>.safetensors`` files that outlive the process.
        hits, misses: lookups answered from memory or disk, and lookups that needed the encoder.
    """

    def __init__(self, max_items: int = 256, max_bytes: int = 1 << 30, folder: str | Path | None = None) -> None:
        self.max_items, self.max_bytes = int(max_items), int(max_bytes)
        self.folder = Path(folder) if folder is not None else None
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._memory)

    @property
    def nbytes(self) -> int:
        """Bytes of the embeddings held in memory."""
        return self._bytes

    def _file(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The embedding stored under ``key`` (memory first, then disk), or ``None``; counts nothing."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.folder is None or not self._file(key).is_file():
            return None

        try:
            with safe_open(str(self._file(key)), framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != key:
                    return None
                embedding = handle.get_tensor("embedding")
        except Exception:  # unreadable (truncated by hand, foreign): a miss, and the encoder's result replaces it
            return None
        self._remember(key, embedding)
        return embedding

    def put(self, key: str, embedding: torch.Tensor) -> None:
        """Store ``embedding`` under ``key`` in memory (evicting the least recently used) and on disk if set."""
        embedding = embedding.detach()
        self._remember(key, embedding)
        if self.folder is not None:
            with atomic_path(self._file(key)) as temporary:
                save_file({"embedding": embedding.cpu().contiguous()}, str(temporary), metadata={"key": key})

    def _remember(self, key: str, embedding: torch.Tensor) -> None:
        if key in self._memory:
            self._bytes -= self._memory.pop(key).nbytes
        self._memory[key] = embedding
        self._bytes += embedding.nbytes
        while self._memory and (len(self._memory) > self.max_items or self._bytes > self.max_bytes):
            _, dropped = self._memory.popitem(last=False)
            self._bytes -= dropped.nbytes

    def get_or_compute(
        self,
        image: np.ndarray | torch.Tensor,
        model: nn.Module,
        preprocessing: str,
        compute: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """The embedding of ``image`` under ``model`` and ``preprocessing``, running ``compute()`` only on a miss.

        Args:
            image: the raw slice the embedding is of (hashed as given, before preprocessing).
            model: the promptable model (its encoder weights are hashed).
            preprocessing: signature of everything between ``image`` and the encoder input.
            compute: returns the embedding ``(1, 256, h, w)`` (or any tensor) when it is not cached.
        """
        key = embedding_key(image, weights_hash(model), preprocessing)
        found = self.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        embedding = compute()
        self.put(key, embedding)
        return embedding

    def clear(self) -> None:
        """Forget everything held in memory (files on disk stay)."""
        self._memory.clear()
        self._bytes = 0
