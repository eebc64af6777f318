"""The native decode step (engine/step/native.py over native/decode_step.cpp) computes what the scripted step computes: the same
logits and the same K/V written to the cache, for dense and quantized weights, GQA / MQA, biases,
sliding windows and batches of sequences with scattered block tables."""

from __future__ import annotations

import pytest
import torch

from loom import native
from loom.compress.quantize.methods import QuantizeRecipe, quantize
from loom.compress.quantize.rtn import QuantConfig
from loom.config import ModelConfig
from loom.engine.kv_cache import KVCache
from loom.engine.runner import ModelRunner
from loom.engine.step import DecodeBatch, NativeStep, ScriptedStep
from loom.layers.quantized import W8A8Linear
from loom.models.transformer import Transformer

BASE = dict(vocab_size=101, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96,
            max_position_embeddings=256)
BLOCK = 4


@pytest.fixture(autouse=True, scope="module")
def _ops_loaded() -> None:
    assert native.available()


def _model(extra: dict, weights: str) -> Transformer:
    model = Transformer(ModelConfig(**BASE, **extra)).init_random(0, std=0.2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # init_random leaves norms at 1 and biases at 0: make them count
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    if weights != "fp32":
        bits, group, symmetric = {"int4": (4, 32, False), "int8": (8, 0, True)}[weights]
        quantize(model, QuantizeRecipe("rtn", QuantConfig(bits=bits, group_size=group, symmetric=symmetric)))
    return model


def _random_cache(model: Transformer, seed: int) -> KVCache:
    cache = KVCache(model.config, 40, BLOCK)
    g = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))  # stands for earlier tokens' keys and values
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache


CONFIGS = [dict(num_kv_heads=2), dict(num_kv_heads=1, tie_word_embeddings=True), dict(num_kv_heads=4, qkv_bias=True),
           dict(num_kv_heads=2, sliding_window=6, sliding_window_layers=(True, False, True))]


@pytest.mark.parametrize("weights", ["fp32", "int4", "int8"])
@pytest.mark.parametrize("extra", CONFIGS)
def test_native_step_equals_the_scripted_step(extra, weights):
    model = _model(extra, weights)
    a, b = _random_cache(model, 1), _random_cache(model, 1)
    with torch.inference_mode():
        native_step, scripted = NativeStep(model, a.k, a.v), ScriptedStep(model, b.k, b.v)
        native_step.max_batch = 8  # the dense limit (1) is about speed, not correctness
        g = torch.Generator().manual_seed(2)
        tables = torch.randperm(40, generator=g)[:30].view(3, 10)  # three sequences' scattered blocks
        lens = torch.tensor([3, 17, 29])
        for _ in range(4):  # each step appends one token per sequence
            tokens = torch.randint(0, 101, (3,), generator=g)
            pos = lens - 1
            slots = tables[torch.arange(3), pos // BLOCK] * BLOCK + pos % BLOCK
            assert native_step.supports(DecodeBatch(tokens, pos, slots, tables, lens))
            got = native_step(DecodeBatch(tokens, pos, slots, tables, lens))
            want = scripted(DecodeBatch(tokens, pos, slots, tables, lens))
            assert got.shape == want.shape == (3, 101)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()
            lens = lens + 1
        for got_kv, want_kv in ((a.k, b.k), (a.v, b.v)):  # the same K/V written at the same slots
            assert (got_kv - want_kv).abs().max() <= 1e-5 * want_kv.abs().max()


def test_batch_limits_follow_the_weights():
    dense, quantized = _model({}, "fp32"), _model({}, "int4")
    for model, limit in ((dense, 1), (quantized, 32)):
        cache = KVCache(model.config, 8, BLOCK)
        assert NativeStep(model, cache.k, cache.v).max_batch == limit


def test_bad_input_gets_a_clear_error():
    model = _model({}, "int4")
    cache = _random_cache(model, 3)
    step = NativeStep(model, cache.k, cache.v)
    table = torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        step(DecodeBatch(torch.tensor([101]), torch.tensor([2]), torch.tensor([2]), table, torch.tensor([3])))
    with pytest.raises(RuntimeError, match="block id out of range"):
        step(DecodeBatch(torch.tensor([5]), torch.tensor([2]), torch.tensor([2]), torch.tensor([[0, 40]]),
                         torch.tensor([3])))
    with pytest.raises(RuntimeError, match="context length"):
        step(DecodeBatch(torch.tensor([5]), torch.tensor([2]), torch.tensor([2]), table, torch.tensor([9])))
    dec = torch.classes.loom.NativeDecoder(model.embed_tokens.weight, model.norm.weight, 4, 2, 16, 1e-5, 0.25)
    with pytest.raises(RuntimeError, match="add_linear after add_layer"):
        dec.add_linear(torch.zeros(8, 64), torch.empty(0), torch.empty(0), 0, 0)


def test_models_with_other_kernels_stay_on_the_scripted_step():
    model = Transformer(ModelConfig(**BASE, num_kv_heads=2)).init_random(0, std=0.2)
    layer = model.layers[1].attn
    layer.o_proj = W8A8Linear(layer.o_proj.weight.detach())  # int8 activations: no native-step kernel
    cache = _random_cache(model, 4)
    runner = ModelRunner(model, cache)
    assert [s.name for s in runner.steps] == ["scripted", "module"]
    with pytest.raises(ValueError, match="native decode step cannot run this model: it takes dense fp32 or loom"):
        ModelRunner(model, cache, "native")
    batch = DecodeBatch(torch.tensor([5]), torch.tensor([2]), torch.tensor([2]), torch.tensor([[0, 1]]),
                        torch.tensor([3]))
    with torch.inference_mode():
        assert runner.decode(batch).shape == (1, 101) and runner.last_decode_step == "scripted"
