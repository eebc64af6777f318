"""The analytic FLOPs of a forward equal a brute-force count by torch's FlopCounterMode.

FlopCounterMode counts matrix multiplications only (mm, addmm, bmm, matmul: 2 m k n each; a bias
add inside addmm is not counted). So the comparison is with ``OpCost.matmul_flops`` summed over
the forward: q/k/v/o projections, the two act-to-act matmuls (q k^T and probs @ v) of every KV head
group, the FFN projections (gate, up, down or up, down) and lm_head. Norms, RoPE, softmax, the
activation, residual adds and bias adds are counted analytically by roofline.forward_ops but are
invisible to FlopCounterMode, so they are not part of this check.

The model runs with the naive attention kernel, which computes the whole [n x l] score rectangle
with plain matmuls (torch's fused SDPA is not counted by FlopCounterMode on CPU); the analytic
count covers the same rectangle (see roofline's docstring).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from loom.analysis.roofline import forward_ops
from loom.config import ModelConfig
from loom.engine.kv_cache import KVCache
from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer

BASE = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
            max_position_embeddings=64)
CONFIGS = {
    "llama-gqa": dict(num_kv_heads=2),
    "mqa-tied": dict(num_kv_heads=1, tie_word_embeddings=True),
    "mha-biases": dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True),
    "gpt-style": dict(norm="layernorm", activation="gelu", gated_mlp=False, position="learned", mlp_bias=True),
    "head-dim-16": dict(num_kv_heads=2, head_dim=16),  # q_size 64 != hidden 32
    # OPT-350m: post-norm, positions at p + 2, an embedding of 16 projected in and out of the 32-wide stream
    "opt-350m-style": dict(norm="layernorm", activation="relu", gated_mlp=False, position="learned", position_offset=2,
                           norm_placement="post", final_norm=False, embedding_size=16, qkv_bias=True,
                           tie_word_embeddings=True),
    "bloom-style": dict(norm="layernorm", activation="gelu_tanh", gated_mlp=False, position="alibi",
                        embedding_norm=True, mlp_bias=True, tie_word_embeddings=True),
}


def make(name: str) -> Transformer:
    return Transformer(ModelConfig(**BASE, **CONFIGS[name]), kernel="naive").init_random(0, std=0.2)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def analytic_matmul_flops(config: ModelConfig, phase: str, n: int, l: int) -> float:
    return sum(o.total_matmul_flops for o in forward_ops(config, phase, n, l))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("n", [1, 7])
def test_prefill_flops_equal_flop_counter(name, n):
    model = make(name)
    ids = torch.randint(0, BASE["vocab_size"], (n,), generator=torch.Generator().manual_seed(0))

    def forward():
        h = model(ids, AttentionMetadata.uncached([n]))
        model.compute_logits(h[-1:])  # an engine samples from the last position only

    assert counted(forward) == analytic_matmul_flops(model.config, "prefill", n, n)


def _cached_step(model: Transformer, cache: KVCache, ids: torch.Tensor, start: int) -> torch.Tensor:
    n = ids.shape[0]
    pos = torch.arange(start, start + n)
    meta = AttentionMetadata(pos, [0, n], [start + n], pos.clone(), torch.tensor([[0]]))
    return model(ids, meta, cache.layers())


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_and_chunked_prefill_flops_equal_flop_counter(name):
    model = make(name)
    cfg = model.config
    ids = torch.randint(0, BASE["vocab_size"], (12,), generator=torch.Generator().manual_seed(1))
    cache = KVCache(cfg, num_blocks=1, block_size=32)
    with torch.no_grad():
        _cached_step(model, cache, ids[:6], 0)  # six tokens already in the cache
    # a chunk of 4 more prompt tokens attends over l = 10 keys
    chunk = counted(lambda: model.compute_logits(_cached_step(model, cache, ids[6:10], 6)[-1:]))
    assert chunk == analytic_matmul_flops(cfg, "prefill", 4, 10)
    # then one decode step at l = 11
    step = counted(lambda: model.compute_logits(_cached_step(model, cache, ids[10:11], 10)))
    assert step == analytic_matmul_flops(cfg, "decode", 1, 11)


def test_analytic_flops_include_more_than_matmuls():
    """The full count adds the elementwise work FlopCounterMode cannot see (a few percent here)."""
    cfg = make("llama-gqa").config
    ops = forward_ops(cfg, "prefill", 7)
    total, mm = sum(o.total_flops for o in ops), sum(o.total_matmul_flops for o in ops)
    assert mm < total < 1.2 * mm
    assert {o.group for o in ops if o.matmul_flops} == {"attn_proj", "attn_act", "ffn", "lm_head"}
