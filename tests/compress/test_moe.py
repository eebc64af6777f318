"""Compression of MoE models: RTN quantizes every expert's linears (weight-only, the router stays dense) and the
model then decodes through the scripted step exactly as through the modules; the methods that do not reach
experts yet refuse MoE models by name."""

from __future__ import annotations

import copy

import pytest
import torch

from loom.compress.prune.methods import PruneRecipe, PruningError, prune
from loom.compress.quantize.methods import QuantizeRecipe, quantize
from loom.compress.quantize.rtn import QuantConfig
from loom.engine.kv_cache import KVCache
from loom.engine.step import DecodeBatch, ModuleStep, ScriptedStep
from loom.layers.attention import AttentionMetadata
from loom.layers.linear import Linear
from loom.layers.quantized import QuantizationError, QuantizedLinear
from tests.engine.step.test_scripted_moe import CASES, moe_model


def test_rtn_quantizes_every_expert_and_the_scripted_step_runs_them():
    model = moe_model(CASES["qwen2_moe"] | dict(intermediate_size=64, moe_intermediate_size=32,
                                                shared_expert_intermediate_size=64))  # sizes of whole groups
    dense = copy.deepcopy(model)
    quantize(model, QuantizeRecipe("rtn", QuantConfig(bits=8, group_size=32)))
    moe = model.layers[0].mlp
    assert all(isinstance(m, QuantizedLinear) for e in moe.experts for m in (e.gate_up_proj, e.down_proj))
    assert isinstance(moe.shared_expert.down_proj, QuantizedLinear)
    assert type(moe.router) is Linear and type(moe.shared_expert_gate) is Linear
    ids = torch.arange(3, 40)
    want, got = dense.logits(ids), model.logits(ids)
    # 8-bit weights: close to the dense model (on average: a token near a routing tie may pick another expert)
    assert (got - want).abs().mean() < 0.01 * want.abs().max()
    cache = KVCache(model.config, 2, 8)
    tables = torch.tensor([[0], [1]])
    with torch.inference_mode():
        for i, p in enumerate(([5, 6, 7], [9, 10])):
            n = len(p)
            model(torch.tensor(p), AttentionMetadata(torch.arange(n), [0, n], [n], torch.arange(n) + 8 * i,
                                                     tables[i:i + 1]), cache.layers())
        batch = DecodeBatch(torch.tensor([1, 2]), torch.tensor([3, 2]), torch.tensor([3, 10]), tables,
                            torch.tensor([4, 3]))
        assert torch.equal(ScriptedStep(model, cache.k, cache.v)(batch), ModuleStep(model, cache.layers())(batch))


def test_methods_that_skip_experts_refuse_moe_models():
    model = moe_model({})
    with pytest.raises(QuantizationError, match="mixture-of-experts"):
        quantize(model, QuantizeRecipe("awq"), torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(PruningError, match="mixture-of-experts"):
        prune(model, PruneRecipe("magnitude"))
