"""Multi-head latent attention (layers/mla.py): the absorbed decode equals the naive up-projection, the paged cache
holds exactly [normalized c_kv | rotated k_rope] per token and layer (and its bytes are what ModelConfig says), the
paged and chunked paths equal the uncached forward, and interleaved RoPE equals halves with permuted weights."""

from __future__ import annotations

import pytest
import torch

from loom.config import ModelConfig
from loom.engine.kv_cache import KVCache
from loom.layers.attention import AttentionMetadata
from loom.layers.mla import MLAttention, set_absorbed
from loom.layers.position import make_rotary, rotate_half
from loom.models.transformer import Transformer

R, ROPE, NOPE, V, HEADS, LAYERS = 16, 8, 12, 10, 4, 2


def mla_config(**fields) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=LAYERS, num_heads=HEADS, intermediate_size=48,
                kv_lora_rank=R, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V, q_lora_rank=20,
                rope_interleave=True, max_position_embeddings=256)
    return ModelConfig(**(base | fields))


def random_layer(config: ModelConfig, seed: int = 0) -> MLAttention:
    """An MLA layer with weights of variance 1 / fan_in (outputs of order one) and norms near one."""
    torch.manual_seed(seed)
    layer = MLAttention(config, 0, make_rotary(config)).requires_grad_(False)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name
                    else torch.randn_like(p) / (p.shape[-1] ** 0.5 if p.dim() == 2 else 10))
    return layer


def paged_meta(new: list[int], cached: list[int], block_size: int, blocks_per_seq: int) -> AttentionMetadata:
    """Sequence i owns blocks [i * blocks_per_seq, (i + 1) * blocks_per_seq), has ``cached[i]`` tokens in the cache
    and computes ``new[i]`` more."""
    positions, slots, starts = [], [], [0]
    for i, (n, c) in enumerate(zip(new, cached)):
        positions += range(c, c + n)
        slots += [i * blocks_per_seq * block_size + p for p in range(c, c + n)]
        starts.append(starts[-1] + n)
    tables = torch.tensor([[i * blocks_per_seq + b for b in range(blocks_per_seq)] for i in range(len(new))])
    return AttentionMetadata(torch.tensor(positions), starts, [c + n for c, n in zip(cached, new)],
                             torch.tensor(slots), tables)


@pytest.mark.parametrize("q_lora_rank", [20, 0], ids=["q-lora", "q-proj"])
def test_absorbed_decode_equals_the_naive_path(q_lora_rank):
    config = mla_config(q_lora_rank=q_lora_rank)
    layer = random_layer(config)
    bs, per_seq, lengths = 4, 8, [5, 13, 9]
    cache = KVCache(config, 3 * per_seq, bs).layers()[0]
    torch.manual_seed(1)
    prompt = torch.randn(sum(lengths), 32)
    layer(prompt, paged_meta(lengths, [0, 0, 0], bs, per_seq), cache)  # prefill (naive: up-projected)
    for step in range(3):  # a decode batch of three, then each sequence alone
        x = torch.randn(3, 32)
        cached = [n + step for n in lengths]
        saved = cache[0].clone()
        outs = {}
        for absorb in (True, False):
            cache[0].copy_(saved)
            layer.absorb = absorb
            outs[absorb] = layer(x, paged_meta([1, 1, 1], cached, bs, per_seq), cache)
        assert outs[True].abs().max() > 0.1  # outputs of order one
        assert (outs[True] - outs[False]).abs().max() < 1e-5, (outs[True] - outs[False]).abs().max()
        for i in range(3):
            alone = {}
            for absorb in (True, False):
                cache[0].copy_(saved)
                layer.absorb = absorb
                meta = paged_meta([1], [cached[i]], bs, per_seq)
                meta.block_tables = meta.block_tables + i * per_seq
                meta.slot_mapping = meta.slot_mapping + i * per_seq * bs
                alone[absorb] = layer(x[i:i + 1], meta, cache)
            assert (alone[True] - alone[False]).abs().max() < 1e-5
            assert (alone[True] - outs[True][i:i + 1]).abs().max() < 1e-5
        layer.absorb = True
        layer(x, paged_meta([1, 1, 1], cached, bs, per_seq), cache)


def test_the_cache_holds_the_normalized_latent_and_the_rotated_rope_key():
    config = mla_config()
    layer = random_layer(config)
    kv = KVCache(config, 4, 4)
    assert kv.k.shape == (LAYERS, 4, 4, 1, R + ROPE) and kv.v.numel() == 0
    x = torch.randn(6, 32)
    layer(x, paged_meta([6], [0], 4, 4), kv.layers()[0])
    c, k_rope = layer.kv_a_proj(x).split([R, ROPE], dim=-1)
    c = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.kv_a_norm.weight  # eps 1e-6 (DeepSeek's)
    pairs = torch.cat((k_rope[:, 0::2], k_rope[:, 1::2]), dim=-1)  # interleaved pairs, gathered into halves
    cos, sin = layer.rotary.cos_sin(torch.arange(6))
    rotated = pairs * cos + rotate_half(pairs) * sin
    want = torch.cat((c, rotated), dim=-1)
    got = kv.k[0].reshape(-1, R + ROPE)[:6]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert kv.k[1].abs().sum() == 0 and kv.k[0].reshape(-1, R + ROPE)[6:].abs().sum() == 0


@pytest.mark.parametrize("dtype,element", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_bytes_per_token_are_the_latent_and_the_rope_key(dtype, element):
    config = mla_config()
    kv = KVCache(config, 10, 16, dtype)
    measured = (kv.k.nbytes + kv.v.nbytes) / kv.num_tokens
    assert measured == (R + ROPE) * LAYERS * element == config.kv_bytes_per_token(element) == kv.nbytes / kv.num_tokens
    assert config.mha_kv_bytes_per_token(element) == LAYERS * HEADS * (NOPE + ROPE + V) * element
    assert KVCache.bytes_per_block(config, 16, dtype) == 16 * (R + ROPE) * LAYERS * element
    with pytest.raises(ValueError, match="latent"):
        KVCache(config, 10, 16, kv_dtype="int8")
    plain = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    assert plain.mha_kv_bytes_per_token(2) == plain.kv_bytes_per_token(2) == 2 * 2 * 8 * 2 * 2


def test_interleaved_rope_equals_halves_with_permuted_rows():
    interleaved = random_layer(mla_config())
    halves = MLAttention(mla_config(rope_interleave=False), 0, make_rotary(mla_config()))
    halves.load_state_dict(interleaved.state_dict())
    perm = torch.cat((torch.arange(0, ROPE, 2), torch.arange(1, ROPE, 2)))
    with torch.no_grad():  # the rope rows of q (per head) and of kv_a, evens first
        q = halves.q_b_proj.weight.view(HEADS, NOPE + ROPE, -1)
        q[:, NOPE:] = q[:, NOPE:][:, perm].clone()
        halves.kv_a_proj.weight[R:] = halves.kv_a_proj.weight[R:][perm].clone()
    x = torch.randn(11, 32)
    meta = AttentionMetadata.uncached([11])
    torch.testing.assert_close(halves(x, meta), interleaved(x, meta), rtol=1e-5, atol=1e-6)


def test_paged_chunks_and_batches_equal_the_uncached_forward():
    config = mla_config(num_experts=0)
    model = Transformer(config).init_random(0, std=0.2)
    ids = torch.randint(0, 64, (17,))
    want = model.logits(ids)
    for absorb in (True, False):
        set_absorbed(model, absorb)
        kv = KVCache(config, 8, 4)
        got, done = [], 0
        for n in (5, 3, 1, 6, 1, 1):  # prefill chunks and decodes
            meta = paged_meta([n], [done], 4, 8)
            got.append(model.logits(ids[done:done + n], meta, kv.layers()))
            done += n
        torch.testing.assert_close(torch.cat(got), want, rtol=1e-5, atol=1e-5)
    lengths = [4, 9, 1]  # an uncached batch: each sequence alone
    batch = torch.randint(0, 64, (sum(lengths),))
    out = model.logits(batch, AttentionMetadata.uncached(lengths))
    start = 0
    for n in lengths:
        torch.testing.assert_close(out[start:start + n], model.logits(batch[start:start + n]), rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("fields", [dict(), dict(q_lora_rank=0), dict(qkv_bias=True, attn_out_bias=True)])
def test_parameter_count(fields):
    config = mla_config(**fields)
    model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.head_dim == NOPE + ROPE and config.rotary_dim == ROPE and config.attn_out_size == HEADS * V


@pytest.mark.parametrize("fields,match", [
    (dict(qk_rope_head_dim=5), "even"),
    (dict(v_head_dim=0), "v_head_dim > 0"),
    (dict(head_dim=8), "head_dim must be"),
    (dict(position="alibi"), "needs RoPE"),
    (dict(sliding_window=8), "does not implement sliding_window"),
    (dict(kv_lora_rank=0), "need kv_lora_rank > 0"),
])
def test_bad_mla_configs_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        mla_config(**fields)


def test_int8_weights_refuse_latent_attention_by_name():
    from loom.models.rotation import rotation_problem

    assert "latent attention" in rotation_problem(Transformer(mla_config()))
