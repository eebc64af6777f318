"""Pooling (Sentence-BERT's mean / CLS, and the last token for decoders), normalization, Matryoshka sizes."""

from __future__ import annotations

import pytest
import torch

from loom.layers.pooling import (EmbeddingSpec, PoolingConfig, l2_normalize, pool_flat, pool_padded,
                                 truncate_dimensions)


def padded_batch(lengths, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(lengths), max(lengths), dim, generator=g)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        hidden[i, n:] = 1e6  # padding states must not leak into any pooling
    return hidden, mask


@pytest.mark.parametrize("mode", ["mean", "cls", "last"])
def test_padded_pooling_reads_only_real_tokens(mode):
    lengths = [5, 2, 1]
    hidden, mask = padded_batch(lengths)
    pooled = pool_padded(hidden, mask, mode)
    for i, n in enumerate(lengths):
        rows = hidden[i, :n]
        want = {"mean": rows.mean(0), "cls": rows[0], "last": rows[-1]}[mode]
        torch.testing.assert_close(pooled[i], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "cls", "last"])
def test_flat_pooling_equals_padded(mode):
    lengths = [3, 6, 1]
    hidden, mask = padded_batch(lengths)
    flat = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(pool_flat(flat, lengths, mode), pool_padded(hidden, mask, mode), rtol=0, atol=1e-6)


def test_normalize_and_truncate():
    x = torch.tensor([[3.0, 4.0, 12.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(l2_normalize(x)[0], torch.tensor([3.0, 4.0, 12.0]) / 13)
    assert torch.equal(l2_normalize(x)[1], torch.zeros(3))  # a zero vector stays zero (no NaN)
    assert torch.equal(truncate_dimensions(x, 2), x[:, :2])
    with pytest.raises(ValueError, match="between 1 and 3"):
        truncate_dimensions(x, 4)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mean, cls, last"):
        PoolingConfig("max")
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_padded(torch.zeros(1, 1, 2), torch.ones(1, 1), "sum")


def test_matryoshka_sizes_are_checked():
    plain = EmbeddingSpec(PoolingConfig(), 512, 384)
    with pytest.raises(ValueError, match="does not support the dimensions parameter"):
        plain.check_dimensions(128)
    EmbeddingSpec(PoolingConfig(), 512, 384, ()).check_dimensions(100)  # any size
    listed = EmbeddingSpec(PoolingConfig(), 512, 768, (64, 128, 768))
    listed.check_dimensions(128)
    with pytest.raises(ValueError, match="64, 128, 768"):
        listed.check_dimensions(100)
