"""A deterministic stand-in for the embedding model: words as tokens, hashed bags of words as vectors."""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np

from loom.rag.embedder import EmbedderInfo, normalize_rows

WORD = re.compile(r"\w+|[^\w\s]")


class FakeEmbedder:
    """Tokens are words and punctuation marks; a text's vector is its lower-cased words hashed into
    ``dimension`` buckets (counts), L2-normalized; a text with no words gets the first unit vector.
    ``calls`` records every batch it was asked to embed."""

    def __init__(self, dimension: int = 64, max_tokens: int = 254, name: str = "fake-hash") -> None:
        self.info = EmbedderInfo(name, f"{name}-{dimension}", dimension, max_tokens, None)
        self.calls: list[list[str]] = []

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in WORD.finditer(text)]

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.info.dimension, np.float32)
        for m in re.finditer(r"\w+", text.lower()):
            v[int(hashlib.md5(m.group().encode()).hexdigest(), 16) % self.info.dimension] += 1
        if not v.any():
            v[0] = 1
        return v

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return normalize_rows(np.stack([self._vector(t) for t in texts])) if texts else \
            np.zeros((0, self.info.dimension), np.float32)

    @property
    def embedded(self) -> int:
        return sum(len(c) for c in self.calls)
