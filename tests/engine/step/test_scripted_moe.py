"""The scripted decode step runs mixture-of-experts layers (Mixtral / Qwen2-MoE shapes): its logits equal the
module forward's, batch after batch, and it counts each expert's tokens as the module does."""

from __future__ import annotations

import pytest
import torch

from loom.config import ModelConfig
from loom.engine.kv_cache import KVCache
from loom.engine.step import DecodeBatch, ModuleStep, NativeStep, ScriptedStep, llama_shaped
from loom.engine.step.native import native_problem
from loom.engine.step.weights import DecoderWeights
from loom.layers import fused
from loom.layers.attention import AttentionMetadata
from loom.layers.moe import expert_token_counts
from loom.models.transformer import Transformer

BASE = dict(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=48,
            max_position_embeddings=64, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16)
CASES = {"mixtral": {}, "qwen2_moe": dict(norm_topk_prob=False, shared_expert_intermediate_size=24, qkv_bias=True,
                                          moe_layers=(True, False, True)),
         "top1-of-6": dict(num_experts_per_tok=1)}


def moe_model(extra: dict, dtype=torch.float32) -> Transformer:
    model = Transformer(ModelConfig(**(BASE | extra)), dtype=dtype).init_random(0, std=0.2)
    with torch.no_grad():  # routers that depend on the token
        for layer in model.layers:
            if hasattr(layer.mlp, "router"):
                layer.mlp.router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    return model


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("script", [True, False], ids=["scripted", "eager"])
def test_scripted_step_equals_the_module_forward(case, script):
    model = moe_model(CASES[case])
    assert llama_shaped(model)
    ids = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = model.logits(torch.tensor(ids))
    cap, n0 = 32, 6
    cache = KVCache(model.config, 1, cap)
    table = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        meta = AttentionMetadata(torch.arange(n0), [0, n0], [n0], torch.arange(n0), table)
        model(torch.tensor(ids[:n0]), meta, cache.layers())
        for layer in model.layers:
            if hasattr(layer.mlp, "reset_counts"):
                layer.mlp.reset_counts()
        step = ScriptedStep(model, cache.k, cache.v, script=script)
        assert isinstance(step.program, torch.jit.ScriptModule) == script
        got = torch.cat([step(DecodeBatch(torch.tensor([ids[p]]), torch.tensor([p]), torch.tensor([p]), table,
                                          torch.tensor([p + 1]))) for p in range(n0, len(ids))])
    assert (got - want[n0:]).abs().max() < 1e-5
    k = model.config.num_experts_per_tok
    assert all(sum(c) == k * (len(ids) - n0) for c in expert_token_counts(model).values())


def test_a_decode_batch_equals_the_module_step_and_its_rows_one_by_one():
    """Four sequences decoded together: experts see several rows (and some none) in one step."""
    model = moe_model(CASES["qwen2_moe"])
    block = 8
    cache = KVCache(model.config, 4, block)
    tables = torch.arange(4).reshape(4, 1)
    prompts = [[5, 9, 13], [40, 2], [77, 78, 79, 80, 81], [11]]
    with torch.inference_mode():
        for i, p in enumerate(prompts):  # each prompt into its own block
            n = len(p)
            meta = AttentionMetadata(torch.arange(n), [0, n], [n], torch.arange(n) + i * block, tables[i:i + 1])
            model(torch.tensor(p), meta, cache.layers())
        step = ScriptedStep(model, cache.k, cache.v)
        lens = torch.tensor([len(p) for p in prompts])
        tokens = torch.tensor([3, 4, 5, 6])
        decode = DecodeBatch(tokens, lens, lens + torch.arange(4) * block, tables, lens + 1)
        batch = step(decode)
        assert torch.equal(batch, ModuleStep(model, cache.layers())(decode))  # the same ops, the same bits
        for i in range(4):
            one = step(DecodeBatch(tokens[i:i + 1], lens[i:i + 1], lens[i:i + 1] + i * block, tables[i:i + 1],
                                   lens[i:i + 1] + 1))
            assert (one - batch[i:i + 1]).abs().max() < 1e-5


def test_bfloat16_scripted_step_is_close_to_the_module_forward():
    model = moe_model(CASES["mixtral"], dtype=torch.bfloat16)
    ids = list(range(10, 22))
    with torch.no_grad():
        want = model.logits(torch.tensor(ids)).float()
    cache = KVCache(model.config, 1, 32, torch.bfloat16)
    table = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        model(torch.tensor(ids[:4]), AttentionMetadata(torch.arange(4), [0, 4], [4], torch.arange(4), table),
              cache.layers())
        step = ScriptedStep(model, cache.k, cache.v)
        got = torch.cat([step(DecodeBatch(torch.tensor([ids[p]]), torch.tensor([p]), torch.tensor([p]), table,
                                          torch.tensor([p + 1]))) for p in range(4, len(ids))])
    assert (got - want[4:]).abs().max() < 0.05 * want.abs().max()


def test_the_native_step_and_qk_norm_models_decline():
    model = moe_model({})
    assert "mixture-of-experts" in (native_problem(DecoderWeights.of(model)) or "") or not fused.native_ops()
    if fused.native_ops():
        with pytest.raises(ValueError, match="mixture-of-experts"):
            NativeStep(model, torch.zeros(1), torch.zeros(1))
    from loom.engine.runner import ModelRunner

    assert [s.name for s in ModelRunner(model, KVCache(model.config, 2, 4)).steps] == ["scripted", "module"]
    olmoe = Transformer(ModelConfig(**BASE, qk_norm_full=True))
    assert not llama_shaped(olmoe)
    assert [s.name for s in ModelRunner(olmoe, KVCache(olmoe.config, 2, 4)).steps] == ["module"]
