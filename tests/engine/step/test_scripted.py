"""The compiled decode steps (scripted, native) compute what the module forward computes, step after step."""

from __future__ import annotations

import pytest
import torch

from loom.config import ModelConfig
from loom.engine.kv_cache import KVCache
from loom.engine.step import DecodeBatch, NativeStep, ScriptedStep, llama_shaped
from loom.engine.step.scripted import DecodeProgram, decode_program
from loom.layers import fused
from loom.layers.attention import AttentionMetadata
from loom.layers.linear_spec import LinearKind
from loom.models.transformer import Transformer

BASE = dict(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48,
            max_position_embeddings=64)
# The compiled steps, each tested against the module forward (the native one where it built).
STEPS = [ScriptedStep] + ([NativeStep] if fused.native_ops() else [])


def step_one(step, token: int, pos: int, table: torch.Tensor) -> torch.Tensor:
    """One sequence whose cache is the single block 0 (the contiguous case: slot = position)."""
    assert table.tolist() == [[0]]
    return step(DecodeBatch(torch.tensor([token]), torch.tensor([pos]), torch.tensor([pos]), table,
                            torch.tensor([pos + 1])))


@pytest.mark.parametrize("extra", [dict(num_kv_heads=2), dict(num_kv_heads=1, tie_word_embeddings=True),
                                   dict(num_kv_heads=4, qkv_bias=True), dict(num_kv_heads=2, sliding_window=4),
                                   dict(num_kv_heads=2, sliding_window=5, sliding_window_layers=(True, False, True))])
@pytest.mark.parametrize("step_class", STEPS)
def test_compiled_steps_equal_module_steps(extra, step_class):
    model = Transformer(ModelConfig(**BASE, **extra)).init_random(0, std=0.2)
    assert llama_shaped(model)
    ids = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = model.logits(torch.tensor(ids))
    cap, n0 = 32, 6
    cache = KVCache(model.config, 1, cap)
    table = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        meta = AttentionMetadata(torch.arange(n0), [0, n0], [n0], torch.arange(n0), table)
        model(torch.tensor(ids[:n0]), meta, cache.layers())  # prefill through the module path
        step = step_class(model, cache.k, cache.v)
        got = torch.cat([step_one(step, ids[p], p, table) for p in range(n0, len(ids))])
    assert (got - want[n0:]).abs().max() < 1e-5


@pytest.mark.parametrize("extra", [dict(norm_placement="post"), dict(position="alibi"), dict(gated_mlp=False),
                                   dict(activation="gelu"), dict(rotary_dim=4), dict(mlp_bias=True),
                                   dict(embedding_norm=True), dict(embedding_size=16)])
def test_other_shapes_use_the_module_path(extra):
    model = Transformer(ModelConfig(**BASE, **extra))
    assert not llama_shaped(model)
    with pytest.raises(ValueError, match="Llama-shaped"):
        ScriptedStep(model, torch.zeros(1), torch.zeros(1))
    assert not llama_shaped(Transformer(ModelConfig(**BASE), dtype=torch.float16))
    cache = KVCache(model.config, 2, 4)
    from loom.engine.runner import ModelRunner

    assert [s.name for s in ModelRunner(model, cache).steps] == ["module"]
    with pytest.raises(ValueError, match="the scripted decode step cannot run this model"):
        ModelRunner(model, cache, "scripted")


def test_generation_identical_through_every_step(smollm):
    from loom.sampling_params import SamplingParams

    p = SamplingParams(temperature=0.7, top_k=50, seed=11, max_tokens=40, min_tokens=40)
    runner = smollm.engine.runner
    assert [s.name for s in runner.steps] == ["native", "scripted", "module"]  # 4-bit weights
    outputs = {}
    try:
        for name in ("native", "scripted", "module"):
            runner.prefer(name)
            outputs[name] = smollm.generate("The history of computing", p)[0].token_ids
            assert runner.last_decode_step == name
    finally:
        runner.prefer(None)
    assert outputs["native"] == outputs["scripted"] == outputs["module"]


def test_step_is_scripted_and_the_python_fallback_agrees():
    assert isinstance(decode_program(fused.native_ops()), torch.jit.ScriptModule)
    assert isinstance(decode_program(fused.native_ops(), script=False), DecodeProgram)
    model = Transformer(ModelConfig(**BASE, num_kv_heads=2)).init_random(3, std=0.2)
    outs = []
    for script in (True, False):
        cache = KVCache(model.config, 1, 16)
        with torch.inference_mode():
            g = ScriptedStep(model, cache.k, cache.v, script=script)
            outs.append(torch.cat([step_one(g, t, p, torch.zeros(1, 1, dtype=torch.long))
                                   for p, t in enumerate([5, 9, 2, 40])]))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("step_class", STEPS)
def test_paged_batch_of_decodes_equals_each_sequence_alone(step_class):
    """Three sequences in a paged cache (blocks of 4, scattered), decoding together through a step."""
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
        graph = step_class(model, cache.k, cache.v)
        if isinstance(graph, NativeStep):
            graph.max_batch = 3  # dense weights: the native step is chosen only at batch 1, but computes any
        got = [[], [], []]
        pos = list(prompt)
        while any(p < len(s) for p, s in zip(pos, seqs)):
            live = [i for i in range(3) if pos[i] < len(seqs[i])]
            width = max(-(-(pos[i] + 1) // bs) for i in live)
            logits = graph(DecodeBatch(torch.tensor([seqs[i][pos[i]] for i in live]),
                                       torch.tensor([pos[i] for i in live]),
                                       torch.tensor([slot(i, pos[i]) for i in live]),
                                       torch.tensor([(tables[i] + [0] * 4)[:width] for i in live]),
                                       torch.tensor([pos[i] + 1 for i in live])))
            for row, i in enumerate(live):
                got[i].append(logits[row])
                pos[i] += 1
    for i in range(3):
        assert (torch.stack(got[i]) - want[i][prompt[i]:]).abs().max() < 1e-5


# The native step takes loom's own quantized kinds only (native_problem).
@pytest.mark.parametrize("bits,group,backend,step_class",
                         [(*q, ScriptedStep) for q in [(4, 32, "loom"), (8, 32, "loom"), (3, 32, "reference"),
                                                       (4, 32, "torch")]]
                         + [(*q, s) for q in [(4, 32, "loom"), (8, 32, "loom")] for s in STEPS[1:]])
def test_steps_run_quantized_linears_like_the_module_path(bits, group, backend, step_class):
    from loom.compress.quantize.methods import QuantizeRecipe, quantize
    from loom.compress.quantize.rtn import QuantConfig

    cfg = ModelConfig(**{**BASE, "hidden_size": 64, "intermediate_size": 96, "num_kv_heads": 2})
    model = quantize(Transformer(cfg).init_random(0, std=0.2), QuantizeRecipe("rtn", QuantConfig(bits, group), backend=backend))
    assert llama_shaped(model)
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = KVCache(model.config, 1, 32)
    table = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        want = torch.cat([model.logits(torch.tensor(ids[: p + 1]))[-1:] for p in range(4, len(ids))])
        meta = AttentionMetadata(torch.arange(4), [0, 4], [4], torch.arange(4), table)
        model(torch.tensor(ids[:4]), meta, cache.layers())
        step = step_class(model, cache.k, cache.v)
        got = torch.cat([step_one(step, ids[p], p, table) for p in range(4, len(ids))])
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
        packed = ScriptedStep(model, caches[0].k, caches[0].v, pack_rows=32)
        plain = ScriptedStep(model, caches[1].k, caches[1].v)
        assert packed.packed_rows == 32 and packed.weights.head.kind == LinearKind.DENSE_PACKED
        assert plain.packed_rows == 0
        tables = torch.randperm(4 * batch, generator=g).view(batch, 4)
        lens = torch.randint(1, 16, (batch,), generator=g)
        tokens = torch.randint(0, 97, (batch,), generator=g)
        slots = tables[torch.arange(batch), (lens - 1) // 4] * 4 + (lens - 1) % 4
        got = packed(DecodeBatch(tokens, lens - 1, slots, tables, lens))
        want = plain(DecodeBatch(tokens, lens - 1, slots, tables, lens))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert ScriptedStep(model, caches[0].k, caches[0].v, pack_rows=8).packed_rows == 0  # too few rows to pay


def assert_bf16_scripted_step_equals_the_module_step(model: Transformer) -> None:
    """Four decode steps of three paged sequences over the same earlier keys and values: the scripted step's
    logits and cache writes equal the module path's, bit for bit."""
    from loom.engine.step import ModuleStep

    caches = [KVCache(model.config, 40, 4, dtype=torch.bfloat16) for _ in range(2)]
    for c in caches:  # the same earlier keys and values in both
        c.k.copy_(torch.randn(c.k.shape, generator=torch.Generator().manual_seed(4)))
        c.v.copy_(torch.randn(c.v.shape, generator=torch.Generator().manual_seed(5)))
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        scripted, module = ScriptedStep(model, caches[0].k, caches[0].v), ModuleStep(model, caches[1].layers())
        tables, lens = torch.randperm(40, generator=g)[:30].view(3, 10), torch.tensor([3, 17, 29])
        for _ in range(4):
            tokens, pos = torch.randint(0, 97, (3,), generator=g), lens - 1
            batch = DecodeBatch(tokens, pos, tables[torch.arange(3), pos // 4] * 4 + pos % 4, tables, lens)
            assert torch.equal(scripted(batch).float(), module(batch))
            lens = lens + 1
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


@pytest.mark.parametrize("extra", [dict(num_kv_heads=2), dict(num_kv_heads=1, tie_word_embeddings=True),
                                   dict(num_kv_heads=4, qkv_bias=True), dict(num_kv_heads=2, sliding_window=5)])
def test_bf16_scripted_step_equals_the_module_step(extra):
    """bf16 models decode through the scripted step over oneDNN-packed linears, bit for bit as the modules do."""
    from loom.layers.linear import onednn_bf16_available, pack_bf16_linears

    model = Transformer(ModelConfig(**{**BASE, "hidden_size": 64, "intermediate_size": 96}, **extra),
                        dtype=torch.bfloat16).init_random(0, std=0.2)
    assert pack_bf16_linears(model) == (13 if onednn_bf16_available() else 0) - ("tie_word_embeddings" in extra)
    assert llama_shaped(model)
    assert_bf16_scripted_step_equals_the_module_step(model)


@pytest.mark.parametrize("extra", [dict(num_kv_heads=2), dict(num_kv_heads=1, tie_word_embeddings=True),
                                   dict(num_kv_heads=4, qkv_bias=True)])
def test_int8_scripted_step_equals_the_module_step(extra):
    """weights "int8" (rotated residual stream, W8A8 decoder linears, bf16 elsewhere): the scripted step computes
    what the modules compute, bit for bit, and both stay close to the fp32 model they came from."""
    from loom.layers.quantized import PackedW8A8Linear, onednn_int8_available
    from loom.weights.loader import w8a8_model

    if not onednn_int8_available():
        pytest.skip("this CPU / torch build has no oneDNN int8 GEMM")
    model = Transformer(ModelConfig(**{**BASE, "hidden_size": 64, "intermediate_size": 96}, **extra)).init_random(0, std=0.2)
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fp32 = model.logits(ids)
        w8a8_model(model)
        int8 = model.logits(ids).float()
    assert model.dtype == torch.bfloat16 and model.residual_rotation is not None
    assert sum(isinstance(m, PackedW8A8Linear) for m in model.modules()) == 4 * 3
    assert (int8 - fp32).norm() / fp32.norm() < 0.1  # int8 noise on a tiny random model; SmolLM2: tests/models
    assert llama_shaped(model)
    assert_bf16_scripted_step_equals_the_module_step(model)


def test_bf16_tied_output_layer_of_many_rows_is_column_major_and_the_same_product():
    """From 8 rows the scripted step computes a tied bf16 output layer as W x^T: column-major logits with
    the module path's values (to bf16 rounding of a different summation order) and the same greedy tokens."""
    from loom.engine.step import ModuleStep
    from loom.layers.fused import argmax_rows

    model = Transformer(ModelConfig(**{**BASE, "hidden_size": 64, "intermediate_size": 96}, num_kv_heads=2,
                                    tie_word_embeddings=True), dtype=torch.bfloat16).init_random(0, std=0.2)
    caches = [KVCache(model.config, 40, 4, dtype=torch.bfloat16) for _ in range(2)]
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        scripted, module = ScriptedStep(model, caches[0].k, caches[0].v), ModuleStep(model, caches[1].layers())
        tokens = torch.randint(0, 97, (10,), generator=g)
        pos = torch.zeros(10, dtype=torch.long)
        tables = torch.arange(10).view(10, 1)
        batch = DecodeBatch(tokens, pos, tables[:, 0] * 4, tables, pos + 1)
        got, want = scripted(batch).float(), module(batch)
    assert got.stride() == (1, 10)
    assert (got - want).abs().max() <= 2 ** -7 * want.abs().max()
    assert torch.equal(argmax_rows(got), torch.argmax(want, dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", [dict(num_kv_heads=2), dict(num_kv_heads=1, sliding_window=5)])
def test_scripted_step_over_an_int8_cache_equals_the_module_step(dtype, extra):
    """An int8 KV cache (layers/kv_quant.py) decodes through the scripted step: its writes and its attention (the
    native int8 kernels, or their PyTorch twins without the build) equal the module path's, bit for bit; the
    program with the PyTorch twins of every kernel stays close to them."""
    from loom.engine.step import ModuleStep

    model = Transformer(ModelConfig(**{**BASE, "hidden_size": 64, "intermediate_size": 96}, **extra),
                        dtype=dtype).init_random(0, std=0.2)
    caches = [KVCache(model.config, 40, 4, dtype=dtype, kv_dtype="int8") for _ in range(3)]
    for c in caches:  # the same earlier keys and values in all three
        c.k.copy_(torch.randint(-127, 128, c.k.shape, generator=torch.Generator().manual_seed(4)))
        c.v.copy_(torch.randint(-128, 128, c.v.shape, generator=torch.Generator().manual_seed(5)))
        c.k_scale.copy_(torch.rand(c.k_scale.shape, generator=torch.Generator().manual_seed(6)) * 0.02 + 0.01)
        c.v_scale.fill_(0.01)
        c.v_zero.copy_(torch.randn(c.v_zero.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
    scales = [(c.k_scale, c.v_scale, c.v_zero) for c in caches]
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        scripted = ScriptedStep(model, caches[0].k, caches[0].v, kv_scales=scales[0])
        module = ModuleStep(model, caches[1].layers())
        twins = ScriptedStep(model, caches[2].k, caches[2].v, kv_scales=scales[2])
        twins.program = decode_program(False, script=False)  # the PyTorch twins, run eagerly
        assert "int8 KV cache" in scripted.describe()
        tables, lens = torch.randperm(40, generator=g)[:30].view(3, 10), torch.tensor([3, 17, 29])
        for _ in range(4):
            tokens, pos = torch.randint(0, 97, (3,), generator=g), lens - 1
            batch = DecodeBatch(tokens, pos, tables[torch.arange(3), pos // 4] * 4 + pos % 4, tables, lens)
            got, want, twin = scripted(batch).float(), module(batch), twins(batch).float()
            assert torch.equal(got, want)
            assert (twin - want).abs().max() <= (1e-4 if dtype == torch.float32 else 0.05) * want.abs().max()
            lens = lens + 1
    a, b = caches[0], caches[1]
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert torch.equal(a.v_scale, b.v_scale) and torch.equal(a.v_zero, b.v_zero)
