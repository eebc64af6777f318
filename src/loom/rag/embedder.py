"""Embedder: the one seam between RAG and an embedding model.

An index stores unit vectors and the identity of the model that made them; a query must be embedded by
the same model (same fingerprint), or its inner products with the index mean nothing. ``LoomEmbedder``
runs a loom encoder (``LLM(path).embed``, default all-MiniLM-L6-v2); the tests plug in a deterministic
fake with the same four members.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from loom.llm import LLM

EMBED_BATCH = 32  # texts per forward: bounds the padded batch's memory


@dataclass(frozen=True)
class EmbedderInfo:
    """Who made an index's vectors. ``fingerprint`` decides whether two embedders are the same model
    (the path may differ between machines); ``max_tokens`` is the most text tokens one input may hold."""

    name: str
    fingerprint: str
    dimension: int
    max_tokens: int
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbedderInfo:
        return cls(str(d["name"]), str(d["fingerprint"]), int(d["dimension"]), int(d["max_tokens"]), d.get("path"))


class Embedder(Protocol):
    """Turns texts into L2-normalized float32 vectors [n, dimension], and splits text into its tokens."""

    @property
    def info(self) -> EmbedderInfo: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def token_spans(self, text: str) -> list[tuple[int, int]]: ...


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as float32: inner product = cosine."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def model_fingerprint(path: str) -> str:
    """A cheap identity of a model on disk: SHA-256 over its config and tokenizer files' bytes and its
    weight files' names and sizes (a folder), or over a single file's size and first MiB (a GGUF)."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        h.update(str(os.path.getsize(path)).encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
        return h.hexdigest()[:16]
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if name.endswith((".safetensors", ".bin", ".gguf", ".pt")):
            h.update(f"{name}:{os.path.getsize(full)}".encode())
        elif name in ("config.json", "tokenizer.json", "sentence_bert_config.json", "modules.json"):
            with open(full, "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def _model_name(path: str) -> str:
    try:
        from loom.default_model import default_embedding_model_path

        if os.path.realpath(path) == os.path.realpath(str(default_embedding_model_path())):
            return "all-MiniLM-L6-v2"
    except (ImportError, FileNotFoundError):
        pass
    path = path.rstrip("/" + os.sep)
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base == "model" else base


class LoomEmbedder:
    """A loom encoder as an Embedder: ``LLM(path).embed``, batched, L2-normalized (default model:
    all-MiniLM-L6-v2, mean pooling, 384 dimensions). The model loads on first use."""

    def __init__(self, path: str | None = None, llm: LLM | None = None) -> None:
        if path is None and llm is None:
            from loom.default_model import default_embedding_model_path

            path = str(default_embedding_model_path())
        self.path = str(path if path is not None else llm.model_path)  # type: ignore[union-attr]
        self._llm = llm
        self._info: EmbedderInfo | None = None
        self._splitter: Any = None

    @property
    def llm(self) -> LLM:
        if self._llm is None:
            from loom.llm import LLM

            self._llm = LLM(self.path)
        return self._llm

    @property
    def info(self) -> EmbedderInfo:
        if self._info is None:
            llm = self.llm
            backend = llm.tokenizer.backend
            # the model's input limit counts the special tokens the tokenizer adds ([CLS] and [SEP])
            max_tokens = llm.embedder.spec.max_tokens - backend.num_special_tokens_to_add(False)
            self._info = EmbedderInfo(_model_name(self.path), model_fingerprint(self.path),
                                      int(llm.embedder.dimensions), int(max_tokens), os.path.abspath(self.path))
        return self._info

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.info.dimension), np.float32)
        # truncate=-1: a question longer than the model reads is cut, as sentence-transformers does
        vectors = self.llm.embed(texts, normalize=True, truncate=-1, batch_size=EMBED_BATCH)
        return normalize_rows(vectors.float().cpu().numpy())

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        if self._splitter is None:
            from tokenizers import Tokenizer as Backend

            # a copy without truncation and padding (all-MiniLM-L6-v2's tokenizer.json pads and cuts to 128)
            self._splitter = Backend.from_str(self.llm.tokenizer.backend.to_str())
            self._splitter.no_truncation()
            self._splitter.no_padding()
        return [(int(a), int(b)) for a, b in self._splitter.encode(text, add_special_tokens=False).offsets]
