"""Speculative decoding on SmolLM2-135M: greedy output equals plain decoding's for every method, and
the rejection sampler keeps the real model's next-token distribution (temperature 1, with and without
top-p) when drafts come from a different real distribution."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from loom.bench.text import PASSAGE
from loom.config import CacheConfig, EngineConfig, SpeculativeConfig
from loom.engine.engine import LLMEngine
from loom.engine.sampler import draw, sampling_distribution
from loom.engine.speculative import Draft, rejection_sample
from loom.layers.attention import AttentionMetadata
from loom.sampling_params import SamplingParams
from tests.stats import chi2_critical

Z_1E6 = 4.753424


def _generate(engine: LLMEngine, ids: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("r", ids, params)
    out = []
    while engine.has_unfinished_requests():
        out += [t for d in engine.step() for t in d.token_ids]
    engine.block_manager.check_invariants(engine.live_sequences())
    return out


def test_greedy_equals_plain_on_the_real_model(smollm, smollm_path):
    ids = smollm.encode_chat([{"role": "user", "content": "Repeat this passage:\n\n" + PASSAGE}])
    params = SamplingParams(temperature=0, max_tokens=48)
    cache = CacheConfig(num_blocks=64)
    plain = _generate(LLMEngine(smollm.model, smollm.tokenizer, EngineConfig(cache=cache)), ids, params)
    for spec in (SpeculativeConfig("ngram", 5), SpeculativeConfig("window", 4, window=32),
                 SpeculativeConfig("draft", 4, draft_model=smollm_path, draft_weights="native")):
        engine = LLMEngine(smollm.model, smollm.tokenizer, EngineConfig(cache=cache, speculative=spec))
        assert _generate(engine, ids, params) == plain, spec.method
        stats = engine.stats().speculative
        assert stats.accepted_tokens > 0 and engine.block_manager.num_used_blocks == 0
        if spec.method == "ngram":  # the answer copies the passage: most drafts are right
            assert stats.tokens_per_pass > 2.5


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_rejection_sampling_keeps_the_real_distribution(smollm, top_p):
    """p: SmolLM2's next-token distribution after a chat prompt; q: the same model's distribution from
    only the last 12 tokens (a short-context draft, as self-drafting makes). Tokens emitted by the
    rejection sampler follow p: chi-square over the tokens expected >= 20 times, the rest pooled."""
    model = smollm.model
    ids = smollm.encode_chat([{"role": "user", "content": "Name a color and say why you like it."}])
    params = SamplingParams(temperature=1.0, top_p=top_p)

    def dist(context: list[int]) -> torch.Tensor:
        hidden = model(torch.tensor(context), AttentionMetadata.uncached([len(context)]))
        return sampling_distribution(model.compute_logits(hidden[-1:])[0].float(), params).double()

    with torch.inference_mode():
        p, q = dist(ids), dist(ids[-12:])
    # The sampler works on any vocabulary: keep the tokens either distribution gives >= 1e-7 (the rest
    # hold < 0.5% of the mass together), so each trial is cheap.
    keep = (p >= 1e-7) | (q >= 1e-7)
    p, q = p[keep] / p[keep].sum(), q[keep] / q[keep].sum()
    tv = 0.5 * float((p - q).abs().sum())
    assert tv > 0.2  # a real disagreement to correct
    g = torch.Generator().manual_seed(0)
    n = 10_000
    emitted = []
    for _ in range(n):
        x = draw(q, g)
        m, token = rejection_sample(torch.stack([p, p]), Draft([x], q[None]), g)
        emitted.append(x if m == 1 else token)
    counts = Counter(emitted)
    assert all(p[t] > 0 for t in counts), "emitted a token the target cannot"
    big = [t for t in range(p.numel()) if n * float(p[t]) >= 20]
    rest = 1.0 - float(p[big].sum())
    stat = sum((counts.get(t, 0) - n * float(p[t])) ** 2 / (n * float(p[t])) for t in big)
    other = n - sum(counts.get(t, 0) for t in big)
    if rest * n >= 5:
        stat += (other - n * rest) ** 2 / (n * rest)
    df = len(big) - (0 if rest * n >= 5 else 1)
    assert len(big) >= 3 and stat < chi2_critical(df, Z_1E6), f"chi2 {stat:.1f}, df {df}"
