"""Which models can be cut in N tensor-parallel shards, and what each rank's shard is."""

from __future__ import annotations

from dataclasses import replace

import pytest

from loom.config import ModelConfig
from loom.models.tensor_parallel import kv_heads_of_rank, shard_config, shard_problem

BASE = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def test_kv_heads_split_or_replicated():
    assert [kv_heads_of_rank(BASE, r, 2) for r in range(2)] == [[0], [1]]
    # 2 KV heads over 4 ranks: ranks 0, 1 read KV head 0 (their query heads 0, 1), ranks 2, 3 KV head 1
    assert [kv_heads_of_rank(BASE, r, 4) for r in range(4)] == [[0], [0], [1], [1]]
    mha = replace(BASE, num_kv_heads=4)
    assert [kv_heads_of_rank(mha, r, 2) for r in range(2)] == [[0, 1], [2, 3]]
    s = shard_config(BASE, 4)
    assert (s.num_heads, s.num_kv_heads, s.intermediate_size, s.head_dim) == (1, 1, 32, 16)


@pytest.mark.parametrize("change,size,words", [
    (dict(), 3, "4 attention heads are not divisible by the tensor-parallel size 3"),
    (dict(num_heads=12, num_kv_heads=6, hidden_size=192), 4, "6 key/value heads are not divisible"),
    (dict(num_heads=6, num_kv_heads=2, hidden_size=96, intermediate_size=192), 6, None),
    (dict(num_heads=12, num_kv_heads=3, hidden_size=192), 4, "not a multiple of the 3 key/value heads"),
    (dict(intermediate_size=130), 4, "130 hidden units are not divisible"),
    (dict(num_experts=4, num_experts_per_tok=2), 2, "mixture-of-experts"),
])
def test_shard_problem_names_what_is_wrong(change, size, words):
    problem = shard_problem(replace(BASE, **change), size)
    assert problem == words if words is None else words in problem
