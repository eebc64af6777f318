"""Exact inner-product search: numpy's top-k equals a full sort (ties in id order); faiss agrees when present."""

from __future__ import annotations

import numpy as np
import pytest

from loom.rag.embedder import normalize_rows
from loom.rag.search import faiss_available, top_k, top_k_numpy


def brute(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    ids = np.array([sorted(range(len(vectors)), key=lambda i: (-row[i], i))[:k] for row in scores])
    return np.take_along_axis(scores, ids, 1), ids


@pytest.mark.parametrize("n, k", [(50, 5), (50, 50), (50, 80), (1, 3), (300, 17)])
def test_numpy_top_k_equals_a_full_sort(n, k):
    rng = np.random.default_rng(n + k)
    vectors = normalize_rows(rng.standard_normal((n, 16)))
    queries = normalize_rows(rng.standard_normal((4, 16)))
    scores, ids = top_k_numpy(vectors, queries, k)
    want_scores, want_ids = brute(vectors, queries, k)
    assert np.array_equal(ids, want_ids) and np.allclose(scores, want_scores)


def test_ties_come_in_id_order():
    vectors = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0.6, 0.8]], np.float32)
    scores, ids = top_k_numpy(vectors, np.array([[1, 0]], np.float32), 2)
    assert ids.tolist() == [[0, 2]] and scores.tolist() == [[1.0, 1.0]]
    _, ids = top_k_numpy(vectors, np.array([[1, 0]], np.float32), 4)
    assert ids.tolist() == [[0, 2, 3, 4]]


def test_empty_index_and_unknown_backend():
    scores, ids = top_k(np.zeros((0, 8), np.float32), np.ones((2, 8), np.float32), 5)
    assert scores.shape == ids.shape == (2, 0)
    with pytest.raises(ValueError, match="unknown search backend"):
        top_k(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), 1, backend="annoy")


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu is not installed (optional)")
def test_faiss_agrees_with_numpy():
    rng = np.random.default_rng(0)
    vectors = normalize_rows(rng.standard_normal((200, 32)))
    queries = normalize_rows(rng.standard_normal((5, 32)))
    s1, i1 = top_k(vectors, queries, 10, "numpy")
    s2, i2 = top_k(vectors, queries, 10, "faiss")
    assert np.array_equal(i1, i2) and np.allclose(s1, s2, atol=1e-5)
