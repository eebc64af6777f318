"""Latent-attention (DeepSeek-V2 / V3) models through the serving engine: greedy generation equals transformers'
generate, a batch of prompts of different lengths equals each prompt alone, chunked prefill, prefix caching, the
absorbed decode gives the naive path's tokens, and the paged cache holds kv_lora_rank + qk_rope_head_dim values
per token and layer."""

from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams
from loom.config import CacheConfig, KVPolicyConfig, SchedulerConfig
from loom.layers.mla import set_absorbed
from loom.tokenizer import tokenizer_from_gguf_metadata
from tests.helpers import TINY_DEEPSEEK, byte_level_metadata, save_tiny_deepseek

PROMPTS = [[5, 17, 42], list(range(30, 160, 7)), [200, 3, 9, 77, 101, 15, 64]]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def tiny_llm(folder, model_type: str, **options):
    hf = save_tiny_deepseek(str(folder), model_type)
    tokenizer_from_gguf_metadata(byte_level_metadata()).save(str(folder))
    llm = LLM(str(folder), weights="fp32", cache=CacheConfig(block_size=4, num_blocks=256), **options)
    return hf, llm


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # n tokens whatever they are, as ignore_eos
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_greedy_generation_equals_transformers(tmp_path, model_type):
    hf, llm = tiny_llm(tmp_path, model_type)
    outs = llm.generate(PROMPTS, GREEDY)
    assert llm.engine.runner.last_decode_step == "module"  # the compiled steps do not take latent attention
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 32)
    for prompt, out in zip(PROMPTS, outs):  # each alone equals its row of the batch
        assert llm.generate([prompt], GREEDY)[0].token_ids == out.token_ids
    set_absorbed(llm.model, False)  # decoding through the up-projected cache gives the same tokens
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == [o.token_ids for o in outs]


def test_chunked_prefill_and_prefix_caching(tmp_path):
    hf, llm = tiny_llm(tmp_path, "deepseek_v2", scheduler=SchedulerConfig(max_num_batched_tokens=8))
    prompt = PROMPTS[1]  # 19 tokens: three prefill chunks of at most 8
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = hf_greedy(hf, prompt, 8)
    assert llm.generate([prompt], params)[0].token_ids == want
    cached = llm.engine.prompt_tokens_cached
    assert llm.generate([prompt], params)[0].token_ids == want  # its blocks again, from the prefix cache
    assert llm.engine.prompt_tokens_cached - cached >= 16
    outs = llm.generate(PROMPTS, params)  # chunks of one prompt in the steps that decode the others
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 8) for p in PROMPTS]


def test_the_paged_cache_holds_the_latents_only(tmp_path):
    _, llm = tiny_llm(tmp_path, "deepseek_v3")
    kv = llm.engine.kv_cache
    r, rope = TINY_DEEPSEEK["kv_lora_rank"], TINY_DEEPSEEK["qk_rope_head_dim"]
    layers = TINY_DEEPSEEK["num_hidden_layers"]
    assert kv.k.shape == (layers, 256, 4, 1, r + rope) and kv.v.numel() == 0
    assert (kv.k.nbytes + kv.v.nbytes) / kv.num_tokens == (r + rope) * layers * 4 == llm.config.kv_bytes_per_token(4)
    heads, qk, v = 4, TINY_DEEPSEEK["qk_nope_head_dim"] + rope, TINY_DEEPSEEK["v_head_dim"]
    assert llm.config.mha_kv_bytes_per_token(4) == layers * heads * (qk + v) * 4  # 624 B against 240 B


def test_kv_policies_are_refused_by_name(tmp_path):
    _, llm = tiny_llm(tmp_path, "deepseek_v2")
    with pytest.raises(ValueError, match="latent attention"):
        llm.engine.check_kv_policy(KVPolicyConfig("window", budget=16))
