"""int8 KV cache: keys per channel, values per token; attention over it equals attention over its
dequantized contents, and stays close to the fp cache."""

from __future__ import annotations

import torch

from loom.config import CacheConfig, ModelConfig
from loom.engine.kv_cache import KVCache
from loom.layers.attention import AttentionMetadata
from loom.layers.kernels import paged_decode_attention_torch
from loom.layers.kv_quant import quantize_keys, quantize_values
from loom.models.transformer import Transformer


def test_value_grid_per_token_is_within_half_a_step():
    v = torch.randn(7, 3, 64) * torch.linspace(0.1, 5, 7)[:, None, None]
    codes, scale, zero = quantize_values(v)
    back = codes.float() * scale[..., None] + zero[..., None]
    assert ((back - v).abs() <= scale[..., None] / 2 + 1e-5).all()
    assert codes.dtype == torch.int8


def test_keys_per_channel_clip_outside_the_calibrated_range():
    scale = torch.full((2, 4), 0.01)
    k = torch.tensor([[[0.5, -0.5, 5.0, -5.0]] * 2])
    codes = quantize_keys(k, scale)
    assert codes.tolist() == [[[50, -50, 127, -127]] * 2]


def test_int8_cache_reads_back_what_it_wrote_and_attention_uses_it():
    cfg = ModelConfig(vocab_size=50, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    cache = KVCache(cfg, num_blocks=4, block_size=4, kv_dtype="int8")
    cache.k_scale.fill_(0.05)
    layer = cache.layers()[0]
    k, v = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    slots = torch.tensor([8, 9, 10, 11, 4, 5])  # block 2, then block 1
    layer.write(k, v, slots)
    kd, vd = layer.gather([2, 1], 6)  # [Hkv, 6, D]
    assert torch.allclose(kd.transpose(0, 1), torch.round(k / 0.05).clamp(-127, 127) * 0.05, atol=1e-6)
    assert (vd.transpose(0, 1) - v).abs().max() < (v.amax(-1) - v.amin(-1)).max() / 255
    q = torch.randn(1, 4, 16)
    tables, lens = torch.tensor([[2, 1]]), torch.tensor([6])
    got = layer.decode_attention(q, tables, lens, 0.25, 0)
    # the definition: fp attention over the dequantized blocks
    kf, vf = layer.dequantize(torch.tensor([0, 1, 2, 3]))
    want = paged_decode_attention_torch(q, kf, vf, tables, lens, 0.25, 0)
    assert torch.allclose(got, want, atol=1e-5)


def test_model_through_an_int8_cache_stays_close_to_fp(tmp_path):
    cfg = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, max_position_embeddings=64)
    model = Transformer(cfg).init_random(0, std=0.1)
    ids = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(0))
    caches = {}
    for kind in ("auto", "int8"):
        cache = KVCache.from_config(cfg, CacheConfig(block_size=8, num_blocks=4, kv_dtype=kind))
        if cache.quantized:
            cache.calibrate_key_scales(model, ids.tolist())
        caches[kind] = cache
    out = {}
    with torch.inference_mode():
        for kind, cache in caches.items():
            table = torch.tensor([[0, 1, 2]])
            meta = AttentionMetadata(torch.arange(24), [0, 24], [24], torch.arange(24), table)
            out[kind] = model.logits(ids, meta, cache.layers())
    err = (out["int8"] - out["auto"]).abs().max() / out["auto"].abs().max()
    assert 0 < err < 0.02
    assert caches["int8"].nbytes < caches["auto"].nbytes / 3


def test_bf16_model_reads_an_int8_cache_in_its_own_dtype():
    """Dequantized keys and values come back in the queries' dtype (a bf16 model, as on CUDA, attends
    over them with bf16 queries): prefill and batched decode through the int8 cache run and stay close
    to the bf16 model over a bf16 cache."""
    cfg = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, max_position_embeddings=64)
    model = Transformer(cfg, dtype=torch.bfloat16).init_random(0, std=0.1)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    out = {}
    for kind in ("auto", "int8"):
        cache = KVCache.from_config(cfg, CacheConfig(block_size=4, num_blocks=8, kv_dtype=kind), torch.bfloat16)
        if cache.quantized:  # each sequence's keys inside the grid: the larger scale of the two
            cache.calibrate_key_scales(model, ids[0].tolist())
            first = cache.k_scale.clone()
            cache.calibrate_key_scales(model, ids[1].tolist())
            cache.k_scale.copy_(torch.maximum(first, cache.k_scale))
        tables = torch.tensor([[0, 1, 2], [3, 4, 5]])
        slots = [b * 4 + p % 4 for row in tables.tolist() for p in range(9) for b in [row[p // 4]]]
        with torch.inference_mode():  # two prompts of 9, then one decode step for both (batched)
            meta = AttentionMetadata(torch.arange(9).repeat(2), [0, 9, 18], [9, 9], torch.tensor(slots), tables)
            model(ids[:, :9].reshape(-1), meta, cache.layers())
            step = AttentionMetadata(torch.tensor([9, 9]), [0, 1, 2], [10, 10],
                                     torch.tensor([2 * 4 + 1, 5 * 4 + 1]), tables)
            out[kind] = model.compute_logits(model(ids[:, 9], step, cache.layers())).float()
    assert out["int8"].dtype == torch.float32 and torch.isfinite(out["int8"]).all()
    assert (out["int8"] - out["auto"]).abs().max() < 0.05 * out["auto"].abs().max()
