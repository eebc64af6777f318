"""Fixtures of the RAG tests: the real embedding model (all-MiniLM-L6-v2) behind loom's Embedder seam."""

from __future__ import annotations

import pytest

from loom.rag.embedder import LoomEmbedder


@pytest.fixture(scope="session")
def embedder() -> LoomEmbedder:
    return LoomEmbedder()
