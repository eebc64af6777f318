"""MoE models through the serving engine: greedy generation equals transformers' generate, a batch of prompts
of different lengths equals each prompt alone, and the engine's stats count the tokens each expert received."""

from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams
from loom.config import CacheConfig, SchedulerConfig
from loom.tokenizer import tokenizer_from_gguf_metadata
from tests.helpers import byte_level_metadata, save_tiny_moe

PROMPTS = [[5, 17, 42], list(range(30, 160, 7)), [200, 3, 9, 77, 101, 15, 64]]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def tiny_llm(folder, model_type: str, **options):
    hf = save_tiny_moe(str(folder), model_type)
    tokenizer_from_gguf_metadata(byte_level_metadata()).save(str(folder))
    llm = LLM(str(folder), weights="fp32", cache=CacheConfig(block_size=4, num_blocks=256), **options)
    return hf, llm


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # 32 tokens whatever they are, as ignore_eos
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_type,decode_step", [("mixtral", "scripted"), ("qwen2_moe", "scripted"),
                                                     ("qwen3_moe", "module"), ("olmoe", "module")])  # QK-norms
def test_greedy_generation_equals_transformers(tmp_path, model_type, decode_step):
    hf, llm = tiny_llm(tmp_path, model_type)
    runner = llm.engine.runner
    outs = llm.generate(PROMPTS, GREEDY)
    assert runner.last_decode_step == decode_step
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 32)
    for prompt, out in zip(PROMPTS, outs):  # each alone equals its row of the batch
        assert llm.generate([prompt], GREEDY)[0].token_ids == out.token_ids
    if decode_step == "scripted":  # and the module step decodes the same tokens
        runner.prefer("module")
        try:
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == [o.token_ids for o in outs]
            assert runner.last_decode_step == "module"
        finally:
            runner.prefer(None)


def test_chunked_prefill_and_expert_counts(tmp_path):
    hf, llm = tiny_llm(tmp_path, "qwen2_moe", scheduler=SchedulerConfig(max_num_batched_tokens=8))
    prompt = PROMPTS[1]  # 19 tokens: three prefill chunks of at most 8
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, prompt, 8)
    stats = llm.engine.stats()
    k = llm.model.config.num_experts_per_tok
    assert sorted(stats.expert_tokens) == [0, 1]
    forwarded = len(prompt) + 8 - 1  # every prompt token and every generated token but the last
    assert all(sum(counts) == k * forwarded for counts in stats.expert_tokens.values())


def test_dense_models_report_no_expert_counts(tmp_path):
    from tests.helpers import save_tiny_hf

    save_tiny_hf(str(tmp_path), "llama", num_key_value_heads=2)
    tokenizer_from_gguf_metadata(byte_level_metadata()).save(str(tmp_path))
    llm = LLM(str(tmp_path), weights="fp32", cache=CacheConfig(block_size=4, num_blocks=64))
    assert llm.engine.stats().expert_tokens is None
