"""SmolLM2-135M from its GGUF against HF transformers on the same weights (transformers' own
conversion of the same file): fp32 logits within 1e-3, greedy continuations identical."""

from __future__ import annotations

import pytest
import torch

from loom.bench.text import PASSAGE
from loom.engine.kv_cache import KVCache
from loom.layers.attention import AttentionMetadata
from loom.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Translate to French: I would like a cup of coffee, please.",
    "1, 1, 2, 3, 5, 8, 13,",
    "Les élèves ont étudié 日本語 and emoji 🙂 together.",
]


def long_prompt(tok) -> list[int]:
    ids = tok.encode(PASSAGE * 9 + "In summary, the most important layer is", add_special_tokens=False)
    assert len(ids) > 1000
    return ids


def test_logits_match_hf(smollm, smollm_hf):
    prompts = [smollm.encode(p) for p in PROMPTS] + [long_prompt(smollm.tokenizer)]
    prompts.append(smollm.encode_chat([{"role": "user", "content": "Name three colors."}]))
    for ids in prompts:
        with torch.no_grad():
            want = smollm_hf(torch.tensor([ids])).logits[0]
            got = smollm.model.logits(torch.tensor(ids))
        diff = (got - want).abs().max().item()
        assert diff <= 1e-3, (len(ids), diff)


def test_cached_decode_logits_match_hf(smollm, smollm_hf):
    """Prefill then token-by-token through the KV cache, against HF's full forward at every position."""
    ids = smollm.encode(PROMPTS[1]) + smollm.encode(" return n if n < 2 else fibonacci(n - 1)")
    n0 = 6
    model = smollm.model
    cache = KVCache(model.config, 1, 64)
    layers, table = cache.layers(), torch.zeros(1, 1, dtype=torch.long)
    got = []
    with torch.no_grad():
        meta = AttentionMetadata(torch.arange(n0), [0, n0], [n0], torch.arange(n0), table)
        got.append(model.compute_logits(model(torch.tensor(ids[:n0]), meta, layers)))
        for p in range(n0, len(ids)):
            meta = AttentionMetadata(torch.tensor([p]), [0, 1], [p + 1], torch.tensor([p]), table)
            got.append(model.compute_logits(model(torch.tensor([ids[p]]), meta, layers)))
        want = smollm_hf(torch.tensor([ids])).logits[0]
    assert (torch.cat(got) - want).abs().max().item() <= 1e-3


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[1], "chat"])
def test_greedy_64_tokens_identical_to_hf(smollm, smollm_hf, prompt):
    if prompt == "chat":
        ids = smollm.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}])
    else:
        ids = smollm.encode(prompt)
    # min_tokens bans EOS as min_new_tokens does in HF, so both produce exactly 64 tokens.
    out = smollm.generate(ids, SamplingParams(temperature=0, max_tokens=64, min_tokens=64))[0]
    with torch.no_grad():
        hf = smollm_hf.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                pad_token_id=2)[0, len(ids):].tolist()
    assert out.token_ids == hf
    assert out.finish_reason == "length" and len(out.token_ids) == 64
