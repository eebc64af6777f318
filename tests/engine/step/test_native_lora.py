"""Multi-LoRA in the native decode step (engine/step/native.py over native/decode_step.cpp): with adapter pools
set, each row of a batch adds its own adapter's products inside the step, and the logits and K/V equal the
module forward with each linear's output plus ``add_lora_reference`` (the fp64 definition), for dense and
int4 weights, rows without an adapter, rows sharing one, and pools filled in place after the step was built."""

from __future__ import annotations

import contextlib

import pytest
import torch

from loom import native
from loom.compress.quantize.methods import QuantizeRecipe, quantize
from loom.compress.quantize.rtn import QuantConfig
from loom.config import ModelConfig
from loom.engine.kv_cache import KVCache
from loom.engine.step import DecodeBatch, ModuleStep, NativeStep
from loom.layers.multi_lora import LayerLora, LoraWeights, add_lora_reference
from loom.models.transformer import Transformer

BASE = dict(vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
            max_position_embeddings=256)
BLOCK = 4
SLOTS = 3  # adapter slots in the pool
RANK = 8


@pytest.fixture(autouse=True, scope="module")
def _ops_loaded() -> None:
    if not native.available():
        pytest.skip("loom's native kernels are not built (LOOM_NATIVE=0 or no compiler)")


def _model(weights: str, extra: dict | None = None) -> Transformer:
    model = Transformer(ModelConfig(**BASE, **(extra or {}))).init_random(0, std=0.2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # init_random leaves norms at 1 and biases at 0: make them count
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    if weights == "int4":
        quantize(model, QuantizeRecipe("rtn", QuantConfig(bits=4, group_size=32, symmetric=False)))
    return model


def _pool(model: Transformer, seed: int, zeros: bool = False) -> list[LayerLora]:
    """Random adapters in every slot of every linear (scale folded into B), big enough to move the logits."""
    c = model.config
    g = torch.Generator().manual_seed(seed)

    def weights(parts: list[int], fan_in: int) -> LoraWeights:
        cols = [0]
        for p in parts:
            cols.append(cols[-1] + p)
        a = torch.randn(SLOTS, len(parts) * RANK, fan_in, generator=g) / fan_in ** 0.5
        b = torch.randn(SLOTS, cols[-1], RANK, generator=g) * 0.3
        return LoraWeights(a * 0 if zeros else a, b * 0 if zeros else b, cols)

    f = c.intermediate_size
    return [LayerLora(weights([c.q_size, c.kv_size, c.kv_size], c.hidden_size), weights([c.hidden_size], c.q_size),
                      weights([f, f], c.hidden_size), weights([c.hidden_size], f)) for _ in range(c.num_layers)]


@contextlib.contextmanager
def _reference_hooks(model: Transformer, pool: list[LayerLora], slots: torch.Tensor):
    """The module forward with y += B_s A_s x (add_lora_reference) on every adapted linear's output."""
    def hook(w: LoraWeights):  # type: ignore[no-untyped-def]
        def add(module, inputs, output):  # type: ignore[no-untyped-def]
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            return add_lora_reference(output.reshape(-1, output.shape[-1]), x, w, slots).view_as(output)
        return add

    handles = []
    for layer, lora in zip(model.layers, pool):
        for module, w in ((layer.attn.qkv_proj, lora.qkv), (layer.attn.o_proj, lora.o),
                          (layer.mlp.gate_up_proj, lora.gate_up), (layer.mlp.down_proj, lora.down)):
            handles.append(module.register_forward_hook(hook(w)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _random_cache(model: Transformer, blocks: int = 40) -> KVCache:
    cache = KVCache(model.config, blocks, BLOCK)
    g = torch.Generator().manual_seed(1)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))  # stands for earlier tokens' keys and values
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache


def _run(model: Transformer, pool: list[LayerLora], slots: list[int], steps: int = 3, seed: int = 2,
         step: NativeStep | None = None) -> None:
    """``steps`` decode steps of len(slots) sequences through the native step and the hooked module forward."""
    b, width = len(slots), 6  # each sequence's block table: 6 blocks
    blocks = max(40, b * width)
    a_cache, m_cache = _random_cache(model, blocks), _random_cache(model, blocks)
    lora_slots = torch.tensor(slots, dtype=torch.long)
    with torch.inference_mode():
        native_step = step or NativeStep(model, a_cache.k, a_cache.v, lora=pool)
        if step is not None:  # a step built by the caller: compare against its cache
            a_cache = None
        native_step.max_batch = max(native_step.max_batch, b)  # the dense limit (1) is about speed, not correctness
        module = ModuleStep(model, m_cache.layers())
        g = torch.Generator().manual_seed(seed)
        tables = torch.randperm(blocks, generator=g)[:b * width].view(b, width)
        lens = torch.randint(1, (width - 1) * BLOCK, (b,), generator=g)
        for _ in range(steps):
            tokens = torch.randint(0, 101, (b,), generator=g)
            pos = lens - 1
            kv_slots = tables[torch.arange(b), pos // BLOCK] * BLOCK + pos % BLOCK
            batch = DecodeBatch(tokens, pos, kv_slots, tables, lens, lora_slots)
            assert native_step.supports(batch)
            got = native_step(batch)
            with _reference_hooks(model, pool, lora_slots):
                want = module(DecodeBatch(tokens, pos, kv_slots, tables, lens))
            assert got.shape == want.shape == (b, 101)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
            lens = lens + 1
    if a_cache is not None:
        for got_kv, want_kv in ((a_cache.k, m_cache.k), (a_cache.v, m_cache.v)):
            assert (got_kv - want_kv).abs().max() <= 1e-4 * want_kv.abs().max()


BATCHES = {"one row": [1], "three rows, one without": [2, -1, 0], "rows sharing an adapter": [2, 2, -1, 2, 0]}


@pytest.mark.parametrize("weights", ["fp32", "int4"])
@pytest.mark.parametrize("slots", list(BATCHES.values()), ids=list(BATCHES))
def test_native_step_adds_each_rows_adapter(slots, weights):
    model = _model(weights)
    _run(model, _pool(model, 7), slots)


def test_int4_batches_up_to_the_limit():
    model = _model("int4")
    g = torch.Generator().manual_seed(3)
    slots = torch.randint(-1, SLOTS, (32,), generator=g).tolist()  # groups of ~8: the transposed expand
    _run(model, _pool(model, 8), slots, steps=2)


def test_biases_and_two_threads():
    model = _model("int4", dict(qkv_bias=True))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the shrink and expand split over threads
        _run(model, _pool(model, 9), [0, 1, -1, 2, 1, 0, 2], steps=2)
    finally:
        torch.set_num_threads(before)


def test_adapters_loaded_into_the_pool_later_are_used():
    model = _model("int4")
    pool = _pool(model, 10, zeros=True)
    cache = _random_cache(model)
    with torch.inference_mode():
        step = NativeStep(model, cache.k, cache.v, lora=pool)
        plain = NativeStep(model, _random_cache(model).k, _random_cache(model).v)
        batch = DecodeBatch.of([5, 9], [2, 6], [2, 6], [[0, 1], [2, 3]], [3, 7], lora_slots=[0, 1])
        base = DecodeBatch.of([5, 9], [2, 6], [2, 6], [[0, 1], [2, 3]], [3, 7])
        assert torch.equal(step(batch), plain(base))  # empty slots add zeros
        for layer, new in zip(pool, _pool(model, 11)):  # an adapter load: in place, no new call
            for w, n in zip(layer, new):
                w.a.copy_(n.a)
                w.b.copy_(n.b)
    _run(model, pool, [0, -1, 1], step=NativeStep(model, _random_cache(model).k, _random_cache(model).v, lora=pool))


def test_no_adapters_in_a_batch_is_the_plain_step():
    model = _model("int4")
    a, b = _random_cache(model), _random_cache(model)
    with torch.inference_mode():
        with_lora, plain = NativeStep(model, a.k, a.v, lora=_pool(model, 12)), NativeStep(model, b.k, b.v)
        args = ([5, 9], [2, 6], [2, 6], [[0, 1], [2, 3]], [3, 7])
        assert torch.equal(with_lora(DecodeBatch.of(*args)), plain(DecodeBatch.of(*args)))
        assert torch.equal(with_lora(DecodeBatch.of(*args, lora_slots=[-1, -1])), plain(DecodeBatch.of(*args)))


def test_a_step_without_pools_declines_batches_with_adapters():
    model = _model("int4")
    cache = _random_cache(model)
    step = NativeStep(model, cache.k, cache.v)
    args = ([5], [2], [2], [[0, 1]], [3])
    assert step.supports(DecodeBatch.of(*args))
    assert not step.supports(DecodeBatch.of(*args, lora_slots=[0]))
    assert NativeStep(model, cache.k, cache.v, lora=_pool(model, 1)).supports(DecodeBatch.of(*args, lora_slots=[0]))


def test_bad_pools_and_slots_get_clear_errors():
    model = _model("int4")
    cache = _random_cache(model)
    pool = _pool(model, 13)
    step = NativeStep(model, cache.k, cache.v, lora=pool)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"LoRA slot 3 of row 1 out of range \[-1, 3\)"):
        step(DecodeBatch.of([5, 6], [2, 2], [2, 6], [[0], [1]], [3, 3], lora_slots=[0, 3]))
    dec = step.decoder
    qkv = pool[0].qkv
    with pytest.raises(RuntimeError, match="layer 2 out of range"):
        dec.set_lora(2, 0, qkv.a, qkv.b, qkv.cols)
    with pytest.raises(RuntimeError, match="linear 4 must be 0..3"):
        dec.set_lora(0, 4, qkv.a, qkv.b, qkv.cols)
    with pytest.raises(RuntimeError, match=r"linear 1 is \[64, 64\] but a takes 64 inputs and b gives 128 outputs"):
        dec.set_lora(0, 1, qkv.a, qkv.b, qkv.cols)
    with pytest.raises(RuntimeError, match="cols must rise from 0"):
        dec.set_lora(0, 0, qkv.a, qkv.b, [0, 64, 96, 100])
    with pytest.raises(RuntimeError, match=r"expected parts \* rank = 2 \* 8"):
        dec.set_lora(0, 0, qkv.a, qkv.b, [0, 64, 128])
    with pytest.raises(ValueError, match="LoRA pools for 1 layers, but the model has 2"):
        NativeStep(model, cache.k, cache.v, lora=pool[:1])
