"""Tensor-parallel shards of linears and embeddings against the whole layer: each rank's part computed here in
one process (the collectives replaced by the sum or concatenation they stand for)."""

from __future__ import annotations

import pytest
import torch

from loom.layers.linear import Linear
from loom.layers.parallel import (RowParallelLinear, ShardingError, TPGroup, VocabParallelEmbedding,
                                  VocabParallelHead, take_columns, take_rows, vocab_range)
from loom.layers.quantized import QuantizedLinear
from tests.helpers import random_quantized_tensor


class Alone(TPGroup):
    """One rank's view with the collectives left out: the test sums or concatenates the ranks itself."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


def dense(n: int, k: int, bias: bool = True) -> Linear:
    layer = Linear(k, n, bias=bias)
    layer.weight.data = torch.randn(n, k)
    if bias:
        layer.bias.data = torch.randn(n)
    return layer


def quantized(n: int, k: int, group: int = 32) -> QuantizedLinear:
    return QuantizedLinear(random_quantized_tensor(n, k, 4, group, seed=1), torch.randn(n), backend="reference")


@pytest.mark.parametrize("make", [dense, quantized])
@pytest.mark.parametrize("size", [2, 4])
def test_row_parallel_sums_to_the_whole(make, size):
    layer = make(48, 128)
    x = torch.randn(5, 128)
    shards = [RowParallelLinear(layer, Alone(r, size)) for r in range(size)]
    k = 128 // size
    partial = sum(s(x[:, r * k:(r + 1) * k]) - s.bias for r, s in enumerate(shards))
    torch.testing.assert_close(partial + layer.bias, layer(x), atol=1e-4, rtol=1e-5)
    assert type(shards[0].inner) is type(layer) and shards[0].inner.bias is None  # the bias is added once


@pytest.mark.parametrize("make", [dense, quantized])
def test_column_shards_are_the_rows_they_keep(make):
    layer = make(64, 64)
    x = torch.randn(3, 64)
    rows = torch.tensor([1, 5, 6, 40, 63])
    part = take_rows(layer, rows)
    assert type(part) is type(layer) and part.out_features == 5
    torch.testing.assert_close(part(x), layer(x)[:, rows], atol=1e-5, rtol=1e-5)


def test_quantized_cut_must_hold_whole_groups():
    layer = quantized(16, 64, group=32)
    assert isinstance(take_columns(layer, 32, 64), QuantizedLinear)
    with pytest.raises(ShardingError, match="inside a quantization group of 32"):
        take_columns(layer, 16, 32)


def test_cut_copies_instead_of_keeping_the_whole_weight():
    layer = dense(64, 64)
    part = take_columns(layer, 0, 32)
    assert part.weight.untyped_storage().nbytes() == 64 * 32 * 4


@pytest.mark.parametrize("vocab,size", [(256, 2), (250, 4)])
def test_vocab_parallel_embedding_and_head(vocab, size):
    table = torch.randn(vocab, 16)
    ids = torch.tensor([0, 1, vocab - 1, 63, 64, 128, 200 % vocab])
    whole = sum(VocabParallelEmbedding(table, vocab, Alone(r, size))(ids) for r in range(size))
    torch.testing.assert_close(whole, table[ids])
    assert [vocab_range(vocab, r, size) for r in range(size)][-1][1] == vocab
    h = torch.randn(3, 16)
    heads = [VocabParallelHead(VocabParallelEmbedding(table, vocab, Alone(r, size)).weight, vocab, Alone(r, size))
             for r in range(size)]
    torch.testing.assert_close(torch.cat([hd.local_logits(h) for hd in heads], dim=-1), h @ table.t())
