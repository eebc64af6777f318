"""The decoder assembled from ModelConfig: against a from-scratch reference forward, against HF
GPT-2 (learned positions, LayerNorm, GELU, biases), and cached decoding against the full forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loom.config import ModelConfig
from loom.engine.kv_cache import KVCache
from loom.layers.attention import AttentionMetadata
from loom.layers.position import alibi_slopes, sinusoidal_table
from loom.models.transformer import Transformer

BASE = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
            max_position_embeddings=64)

CONFIGS = {
    "llama-gqa": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1, tie_word_embeddings=True),
    "mha-bias": dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True),
    "post-layernorm-gelu-learned": dict(norm="layernorm", norm_placement="post", final_norm=False,
                                        activation="gelu", gated_mlp=False, position="learned"),
    "alibi-relu": dict(position="alibi", activation="relu", gated_mlp=False, norm="layernorm"),
    "sinusoidal": dict(position="sinusoidal", activation="gelu_tanh"),
    "nopos": dict(position="none"),
    "window": dict(sliding_window=3, num_kv_heads=2),
    "partial-rotary": dict(rotary_dim=4, rope_theta=500.0),
}


def make(name: str, seed: int = 0) -> Transformer:
    return Transformer(ModelConfig(**BASE, **CONFIGS[name])).init_random(seed, std=0.2)


def reference_forward(model: Transformer, ids: list[int]) -> torch.Tensor:
    """Logits for one sequence, recomputed from the parameters with explicit loops over heads."""
    c = model.config
    n = len(ids)
    h = model.embed_tokens.weight[torch.tensor(ids)].double()
    if c.position == "learned":
        h = h + model.pos_embed.weight[:n].double()
    elif c.position == "sinusoidal":
        h = h + sinusoidal_table(n, c.hidden_size).double()

    def norm(mod, x):
        w = mod.weight.double()
        if c.norm == "rmsnorm":
            y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps) * w
        else:
            y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + c.norm_eps) * w
        return y + mod.bias.double() if mod.bias is not None else y

    def lin(mod, x):
        y = x @ mod.weight.double().T
        return y + mod.bias.double() if mod.bias is not None else y

    def rope(x, pos):  # x [heads, d]
        rd = c.rotary_dim
        out = x.clone()
        for i in range(rd // 2):
            a = pos * c.rope_theta ** (-2 * i / rd)
            x1, x2 = x[:, i].clone(), x[:, i + rd // 2].clone()
            out[:, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[:, i + rd // 2] = x1 * math.sin(a) + x2 * math.cos(a)
        return out

    act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
    slopes = alibi_slopes(c.num_heads).double()
    for layer_idx, layer in enumerate(model.layers):
        a = layer.attn
        x = norm(layer.attn_norm, h) if c.norm_placement == "pre" else h
        qkv = lin(a.qkv_proj, x)
        q = qkv[:, : c.q_size].reshape(n, c.num_heads, c.head_dim)
        k = qkv[:, c.q_size: c.q_size + c.kv_size].reshape(n, c.num_kv_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size:].reshape(n, c.num_kv_heads, c.head_dim)
        if c.position == "rope":
            q = torch.stack([rope(q[t], t) for t in range(n)])
            k = torch.stack([rope(k[t], t) for t in range(n)])
        o = torch.zeros(n, c.num_heads, c.head_dim, dtype=torch.float64)
        window = c.layer_window(layer_idx)
        for hh in range(c.num_heads):
            kv = hh // c.queries_per_kv
            for i in range(n):
                js = [j for j in range(i + 1) if window is None or j > i - window]
                s = torch.stack([q[i, hh] @ k[j, kv] for j in js]) / math.sqrt(c.head_dim)
                if c.position == "alibi":
                    s = s - slopes[hh] * torch.tensor([i - j for j in js], dtype=torch.float64)
                p = torch.softmax(s, 0)
                o[i, hh] = sum(p[t] * v[j, kv] for t, j in enumerate(js))
        attn = lin(a.o_proj, o.reshape(n, c.q_size))
        if c.norm_placement == "pre":
            h = h + attn
            x = norm(layer.mlp_norm, h)
        else:
            h = norm(layer.attn_norm, h + attn)
            x = h
        m = layer.mlp
        if c.gated_mlp:
            gu = lin(m.gate_up_proj, x)
            y = lin(m.down_proj, act[c.activation](gu[:, : c.intermediate_size]) * gu[:, c.intermediate_size:])
        else:
            y = lin(m.down_proj, act[c.activation](lin(m.up_proj, x)))
        h = h + y if c.norm_placement == "pre" else norm(layer.mlp_norm, h + y)
    if c.final_norm:
        h = norm(model.norm, h)
    return h @ model.output_weight.double().T


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_reference(name):
    model = make(name)
    ids = torch.randint(0, BASE["vocab_size"], (9,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        got = model.logits(torch.tensor(ids)).double()
    assert (got - reference_forward(model, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("kernel", ["naive", "flash", "split_kv"])
def test_kernels_agree_inside_the_model(name, kernel):
    model = make(name)
    ids = torch.randint(0, BASE["vocab_size"], (11,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.logits(ids)
        model.set_kernel(kernel)
        got = model.logits(ids)
    assert (got - want).abs().max() < 1e-4


def run_cached(model: Transformer, ids: list[int], chunks: list[int], block_size: int, num_blocks: int,
               table: list[int]) -> torch.Tensor:
    """Logits of every position, feeding ``ids`` in chunks through a paged cache."""
    cache = KVCache(model.config, num_blocks, block_size)
    layers = cache.layers()
    out, done = [], 0
    for n in chunks:
        pos = torch.arange(done, done + n)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in pos.tolist()])
        meta = AttentionMetadata(pos, [0, n], [done + n], slots, torch.tensor([table]))
        with torch.no_grad():
            out.append(model.compute_logits(model(torch.tensor(ids[done:done + n]), meta, layers)))
        done += n
    return torch.cat(out)


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_equals_full_forward(name):
    model = make(name)
    ids = torch.randint(0, BASE["vocab_size"], (13,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        full = model.logits(torch.tensor(ids))
    # contiguous: one block as long as the sequence; prefill 5, then one token at a time
    got = run_cached(model, ids, [5] + [1] * 8, block_size=16, num_blocks=1, table=[0])
    assert (got - full).abs().max() < 1e-4
    # paged: blocks of 4 scattered over the pool; uneven chunks that straddle blocks
    got = run_cached(model, ids, [3, 6, 1, 3], block_size=4, num_blocks=9, table=[7, 2, 5, 0])
    assert (got - full).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["llama-gqa", "alibi-relu", "window"])
def test_flat_batch_equals_each_sequence_alone(name):
    model = make(name)
    g = torch.Generator().manual_seed(4)
    for lengths in ((5, 1, 8), (6, 6, 6)):  # the second: equal lengths, one [B, H, T, D] attention call
        seqs = [torch.randint(0, BASE["vocab_size"], (n,), generator=g) for n in lengths]
        meta = AttentionMetadata.uncached([len(s) for s in seqs])
        assert (meta.equal_uncached_length is not None) == (lengths == (6, 6, 6))
        with torch.no_grad():
            batched = model.logits(torch.cat(seqs), meta)
            alone = torch.cat([model.logits(s) for s in seqs])
        assert (batched - alone).abs().max() < 1e-5


def test_gpt2_matches_transformers():
    """Learned positions, LayerNorm with bias, GELU (tanh), biased projections, tied head: HF GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=3, n_head=4)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    cfg = ModelConfig(vocab_size=101, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=128,
                      activation="gelu_tanh", gated_mlp=False, norm="layernorm", position="learned",
                      max_position_embeddings=64, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                      tie_word_embeddings=True)
    model = Transformer(cfg)
    sd = hf.state_dict()
    mine = {"embed_tokens.weight": sd["transformer.wte.weight"], "pos_embed.weight": sd["transformer.wpe.weight"],
            "norm.weight": sd["transformer.ln_f.weight"], "norm.bias": sd["transformer.ln_f.bias"]}
    for i in range(3):
        h = f"transformer.h.{i}."
        # GPT-2's Conv1D stores weights as [in, out]: transpose to [out, in].
        mine.update({
            f"layers.{i}.attn_norm.weight": sd[h + "ln_1.weight"], f"layers.{i}.attn_norm.bias": sd[h + "ln_1.bias"],
            f"layers.{i}.attn.qkv_proj.weight": sd[h + "attn.c_attn.weight"].T,
            f"layers.{i}.attn.qkv_proj.bias": sd[h + "attn.c_attn.bias"],
            f"layers.{i}.attn.o_proj.weight": sd[h + "attn.c_proj.weight"].T,
            f"layers.{i}.attn.o_proj.bias": sd[h + "attn.c_proj.bias"],
            f"layers.{i}.mlp_norm.weight": sd[h + "ln_2.weight"], f"layers.{i}.mlp_norm.bias": sd[h + "ln_2.bias"],
            f"layers.{i}.mlp.up_proj.weight": sd[h + "mlp.c_fc.weight"].T,
            f"layers.{i}.mlp.up_proj.bias": sd[h + "mlp.c_fc.bias"],
            f"layers.{i}.mlp.down_proj.weight": sd[h + "mlp.c_proj.weight"].T,
            f"layers.{i}.mlp.down_proj.bias": sd[h + "mlp.c_proj.bias"],
        })
    model.load_state_dict(mine, strict=True)
    ids = torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        got = model.logits(ids)
    assert (got - want).abs().max() < 1e-4


def test_config_roundtrip_and_counts():
    c = ModelConfig(**BASE, **CONFIGS["mha-bias"])
    assert ModelConfig.from_dict(c.to_dict()) == c
    model = Transformer(c)
    assert sum(p.numel() for p in model.parameters()) == c.num_parameters()
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(**{**BASE, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**c.to_dict(), "bogus": 1})


@pytest.mark.parametrize("name", ["llama-gqa", "window", "alibi-relu"])
def test_mixed_paged_batch_equals_each_sequence_alone(name):
    """One forward mixing decodes (one token) and prefill chunks (several), over a paged cache."""
    model = make(name)
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, BASE["vocab_size"], (n,), generator=g).tolist() for n in (12, 7, 10, 9)]
    with torch.no_grad():
        want = [model.logits(torch.tensor(s)) for s in seqs]
    bs = 4
    cache = KVCache(model.config, 24, bs)
    tables = [[20, 3, 9], [1, 14, 0], [7, 8, 0], [22, 5, 11]]  # padded with block 0
    slot = lambda i, p: tables[i][p // bs] * bs + p % bs
    done = [0, 0, 0, 0]
    got: list[list[torch.Tensor]] = [[], [], [], []]
    plan = [[5, 3, 4, 6], [1, 4, 1, 1], [1, 1, 5, 1], [5, 1, 0, 1]]  # tokens per sequence per step
    with torch.no_grad():
        for chunk in plan:
            live = [i for i in range(4) if chunk[i] and done[i] < len(seqs[i])]
            ids, pos, slots, starts = [], [], [], [0]
            for i in live:
                n = min(chunk[i], len(seqs[i]) - done[i])
                ids += seqs[i][done[i]:done[i] + n]
                pos += list(range(done[i], done[i] + n))
                slots += [slot(i, p) for p in range(done[i], done[i] + n)]
                starts.append(starts[-1] + n)
            meta = AttentionMetadata(torch.tensor(pos), starts, [done[i] + starts[k + 1] - starts[k]
                                                                 for k, i in enumerate(live)],
                                     torch.tensor(slots), torch.tensor([tables[i] for i in live]))
            logits = model.compute_logits(model(torch.tensor(ids), meta, cache.layers()))
            for k, i in enumerate(live):
                got[i].append(logits[starts[k]:starts[k + 1]])
                done[i] += starts[k + 1] - starts[k]
    for i in range(4):
        full = torch.cat(got[i])
        assert (full - want[i][: len(full)]).abs().max() < 1e-4, (i, (full - want[i][: len(full)]).abs().amax(-1))
