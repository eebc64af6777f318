"""The scripted decode step computes what the module forward computes, step after step."""

from __future__ import annotations

import pytest
import torch

from loom.config import ModelConfig
from loom.engine.kv_cache import KVCache
from loom.layers.attention import AttentionMetadata
from loom.layers.quantized import DENSE_PACKED
from loom.models.decode_graph import DecodeGraph
from loom.models.transformer import Transformer

BASE = dict(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48,
            max_position_embeddings=64)


@pytest.mark.parametrize("extra", [dict(num_kv_heads=2), dict(num_kv_heads=1, tie_word_embeddings=True),
                                   dict(num_kv_heads=4, qkv_bias=True), dict(num_kv_heads=2, sliding_window=4),
                                   dict(num_kv_heads=2, sliding_window=5, sliding_window_layers=(True, False, True))])
def test_graph_steps_equal_module_steps(extra):
    model = Transformer(ModelConfig(**BASE, **extra)).init_random(0, std=0.2)
    assert DecodeGraph.supports(model)
    ids = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = model.logits(torch.tensor(ids))
    cap, n0 = 32, 6
    cache = KVCache(model.config, 1, cap)
    table = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        meta = AttentionMetadata(torch.arange(n0), [0, n0], [n0], torch.arange(n0), table)
        model(torch.tensor(ids[:n0]), meta, cache.layers())  # prefill through the module path
        graph = DecodeGraph(model, cache.k, cache.v)
        got = torch.cat([graph.step_one(ids[p], p, table) for p in range(n0, len(ids))])
    assert (got - want[n0:]).abs().max() < 1e-5


@pytest.mark.parametrize("extra", [dict(norm_placement="post"), dict(position="alibi"), dict(gated_mlp=False),
                                   dict(activation="gelu"), dict(rotary_dim=4), dict(mlp_bias=True)])
def test_other_shapes_use_the_module_path(extra):
    model = Transformer(ModelConfig(**BASE, **extra))
    assert not DecodeGraph.supports(model)
    with pytest.raises(ValueError, match="Llama-shaped"):
        DecodeGraph(model, torch.zeros(1), torch.zeros(1))
    assert not DecodeGraph.supports(Transformer(ModelConfig(**BASE), dtype=torch.bfloat16))


def test_generation_identical_with_and_without_graph(smollm):
    from loom.sampling_params import SamplingParams

    p = SamplingParams(temperature=0.7, top_k=50, seed=11, max_tokens=40, min_tokens=40)
    with_graph = smollm.generate("The history of computing", p)[0].token_ids
    smollm.engine.runner.use_graph = False
    try:
        without = smollm.generate("The history of computing", p)[0].token_ids
    finally:
        smollm.engine.runner.use_graph = True
    assert with_graph == without


def test_step_is_scripted_and_the_python_fallback_agrees(monkeypatch):
    from loom.models import decode_graph

    assert isinstance(decode_graph.compiled_decode_step(), torch.jit.ScriptFunction)
    model = Transformer(ModelConfig(**BASE, num_kv_heads=2)).init_random(3, std=0.2)
    outs = []
    for fn in (decode_graph.compiled_decode_step(), decode_graph._decode_step):
        monkeypatch.setattr(decode_graph, "compiled_decode_step", lambda fn=fn: fn)
        cache = KVCache(model.config, 1, 16)
        with torch.inference_mode():
            g = DecodeGraph(model, cache.k, cache.v)
            outs.append(torch.cat([g.step_one(t, p, torch.zeros(1, 1, dtype=torch.long))
                                   for p, t in enumerate([5, 9, 2, 40])]))
    assert torch.equal(outs[0], outs[1])


def test_paged_batch_of_decodes_equals_each_sequence_alone():
    """Three sequences in a paged cache (blocks of 4, scattered), decoding together through the graph."""
    model = Transformer(ModelConfig(**BASE, num_kv_heads=2, sliding_window=6)).init_random(5, std=0.2)
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 4, 14)]
    with torch.no_grad():
        want = [model.logits(torch.tensor(s)) for s in seqs]
    bs, cache = 4, KVCache(model.config, 30, 4)
    perm = torch.randperm(30, generator=g).tolist()
    tables = [perm[0:4], perm[4:6], perm[6:10]]  # enough blocks for each sequence's full length
    prompt = [3, 2, 7]  # tokens prefilled through the module path, the rest decoded together
    slot = lambda i, p: tables[i][p // bs] * bs + p % bs
    with torch.inference_mode():
        ids = torch.tensor([t for i, s in enumerate(seqs) for t in s[:prompt[i]]])
        starts = [0, 3, 5, 12]
        meta = AttentionMetadata(torch.cat([torch.arange(n) for n in prompt]), starts, prompt,
                                 torch.tensor([slot(i, p) for i in range(3) for p in range(prompt[i])]),
                                 torch.tensor([t + [0] * (4 - len(t)) for t in tables]))
        model(ids, meta, cache.layers())
        graph = DecodeGraph(model, cache.k, cache.v)
        got = [[], [], []]
        pos = list(prompt)
        while any(p < len(s) for p, s in zip(pos, seqs)):
            live = [i for i in range(3) if pos[i] < len(seqs[i])]
            width = max(-(-(pos[i] + 1) // bs) for i in live)
            logits = graph(torch.tensor([seqs[i][pos[i]] for i in live]), torch.tensor([pos[i] for i in live]),
                           torch.tensor([slot(i, pos[i]) for i in live]),
                           torch.tensor([(tables[i] + [0] * 4)[:width] for i in live]),
                           torch.tensor([pos[i] + 1 for i in live]))
            for row, i in enumerate(live):
                got[i].append(logits[row])
                pos[i] += 1
    for i in range(3):
        assert (torch.stack(got[i]) - want[i][prompt[i]:]).abs().max() < 1e-5


@pytest.mark.parametrize("bits,group,backend", [(4, 32, "loom"), (8, 32, "loom"), (3, 32, "reference"),
                                                (4, 32, "torch")])
def test_graph_runs_quantized_linears_like_the_module_path(bits, group, backend):
    from loom.compress.quantize.methods import QuantizeRecipe, quantize
    from loom.compress.quantize.rtn import QuantConfig

    cfg = ModelConfig(**{**BASE, "hidden_size": 64, "intermediate_size": 96, "num_kv_heads": 2})
    model = quantize(Transformer(cfg).init_random(0, std=0.2), QuantizeRecipe("rtn", QuantConfig(bits, group), backend=backend))
    assert DecodeGraph.supports(model)
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = KVCache(model.config, 1, 32)
    table = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        want = torch.cat([model.logits(torch.tensor(ids[: p + 1]))[-1:] for p in range(4, len(ids))])
        meta = AttentionMetadata(torch.arange(4), [0, 4], [4], torch.arange(4), table)
        model(torch.tensor(ids[:4]), meta, cache.layers())
        graph = DecodeGraph(model, cache.k, cache.v)
        got = torch.cat([graph.step_one(ids[p], p, table) for p in range(4, len(ids))])
    assert (got - want).abs().max() < 1e-4 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("batch", [32, 20, 3])  # the packed row count, padded up to it, and unpacked
def test_packed_dense_weights_give_the_same_logits(batch):
    if not torch.backends.mkl.is_available():
        pytest.skip("MKL's packed GEMM needs a torch built with MKL")
    model = Transformer(ModelConfig(**BASE, num_kv_heads=2)).init_random(0, std=0.2)
    caches = [KVCache(model.config, 4 * batch, 4) for _ in range(2)]
    g = torch.Generator().manual_seed(3)
    for c in caches:
        c.k.copy_(torch.randn(c.k.shape, generator=torch.Generator().manual_seed(4)))
        c.v.copy_(torch.randn(c.v.shape, generator=torch.Generator().manual_seed(5)))
    with torch.inference_mode():
        packed = DecodeGraph(model, caches[0].k, caches[0].v, native=False, pack_rows=32)
        plain = DecodeGraph(model, caches[1].k, caches[1].v, native=False)
        assert packed.packed_rows == 32 and packed.head[0] == DENSE_PACKED and plain.packed_rows == 0
        tables = torch.randperm(4 * batch, generator=g).view(batch, 4)
        lens = torch.randint(1, 16, (batch,), generator=g)
        tokens = torch.randint(0, 97, (batch,), generator=g)
        slots = tables[torch.arange(batch), (lens - 1) // 4] * 4 + (lens - 1) % 4
        got = packed(tokens, lens - 1, slots, tables, lens)
        want = plain(tokens, lens - 1, slots, tables, lens)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert DecodeGraph(model, caches[0].k, caches[0].v, pack_rows=8).packed_rows == 0  # too few rows to pay
