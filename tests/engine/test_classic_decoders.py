"""GPT-2, OPT and BLOOM through the serving engine (the module step over the paged KV cache): greedy tokens
equal transformers' ``generate``, and prompts of different lengths batched together (chunked prefill,
batched decodes, learned positions and ALiBi read from the metadata's positions) give each prompt's tokens
alone."""

from __future__ import annotations

import random

import pytest
import torch

from loom import LLM, SamplingParams
from loom.config import CacheConfig, SchedulerConfig
from tests.helpers import save_tiny_hf

MODELS = {
    "gpt2": ("gpt2", dict()),
    "opt": ("opt", dict(ffn_dim=128)),
    "opt-350m-post-norm": ("opt", dict(ffn_dim=128, do_layer_norm_before=False, word_embed_proj_dim=32)),
    "bloom-6-heads": ("bloom", dict(num_attention_heads=6, hidden_size=72)),
}
NEW_TOKENS = 32
WEIGHT_STD = 0.2
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def save_byte_level_tokenizer(folder) -> None:
    """tokenizer.json for the 256 byte tokens (no merges), as a model with vocab_size 256 needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module", params=list(MODELS))
def served(request, tmp_path_factory):
    """(HF model, LLM) on the same tiny checkpoint: blocks of 4 tokens and 16-token steps, so that prompts
    are prefilled in chunks over many blocks and decodes run batched."""
    model_type, overrides = MODELS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    # no end-of-sequence token: both sides generate every token asked for
    hf = save_tiny_hf(str(folder), model_type, seed=1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      **overrides)
    with torch.no_grad():  # weights of std 0.02 give one token over and over: make every input matter
        gen = torch.Generator().manual_seed(1)
        for p in hf.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * WEIGHT_STD)
    hf.save_pretrained(str(folder))
    save_byte_level_tokenizer(folder)
    llm = LLM(str(folder), weights="fp32", cache=CacheConfig(block_size=4, num_blocks=256),
              scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8))
    return hf, llm


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(length)] for length in rng.sample(range(1, 45), n)]


def hf_greedy(hf, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


def test_the_module_step_serves_them(served):
    _, llm = served
    assert [s.name for s in llm.engine.runner.steps] == ["module"]


def test_greedy_tokens_equal_transformers_generate(served):
    hf, llm = served
    seen: set[int] = set()
    for ids in prompts(3, seed=1):
        out = llm.generate(ids, GREEDY)[0]
        assert len(out.token_ids) == NEW_TOKENS
        assert out.token_ids == hf_greedy(hf, ids), len(ids)
        seen.update(out.token_ids)
    assert len(seen) >= 6, seen  # not one token over and over: the continuations depend on their context


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_batch_of_different_lengths_equals_each_prompt_alone(served, prefix_caching):
    _, llm = served
    if not prefix_caching:  # every prompt token computed again in the batch, in 16-token chunks
        llm = LLM(llm.model_path, weights="fp32", cache=CacheConfig(block_size=4, num_blocks=256,
                                                                    enable_prefix_caching=False),
                  scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8))
    batch = prompts(6, seed=2)
    alone = [llm.generate(ids, GREEDY)[0].token_ids for ids in batch]
    together = [o.token_ids for o in llm.generate(batch, GREEDY)]
    assert together == alone
    assert all(len(t) == NEW_TOKENS for t in together)


def test_the_int8_kv_cache_calibrates_within_the_context(served):
    """The int8 cache's key scales come from up to 1,024 calibration tokens: a model with a shorter learned
    position table (512 here) calibrates on as many as it has positions, and serves."""
    _, llm = served
    assert llm.model.config.max_position_embeddings < 1024
    q = LLM(llm.model_path, weights="fp32", cache=CacheConfig(block_size=4, num_blocks=256, kv_dtype="int8"))
    assert len(q.generate(prompts(1, seed=3)[0], GREEDY)[0].token_ids) == NEW_TOKENS
