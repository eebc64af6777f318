"""weights "int8" on the real model: W8A8 decoder linears over a rotated residual stream lose almost nothing."""

from __future__ import annotations

import pytest

from loom.layers.quantized import onednn_int8_available


@pytest.mark.skipif(not onednn_int8_available(), reason="this CPU / torch build has no oneDNN int8 GEMM")
def test_int8_perplexity_is_within_half_a_percent_of_fp32(smollm):
    """8 windows of 512 britannica tokens (docs/RESULTS.md has the 40-window figure: +0.11%)."""
    from loom.eval.corpora import corpus_path, read_corpus
    from loom.eval.perplexity import load_for_eval, perplexity

    loaded, tokenizer = load_for_eval(weights="int8")
    ids = tokenizer.encode(read_corpus(corpus_path("britannica")))
    fp32 = perplexity(smollm.engine.model, ids, 512, max_tokens=4096, progress=False).perplexity
    int8 = perplexity(loaded.model, ids, 512, max_tokens=4096, progress=False).perplexity
    assert abs(int8 / fp32 - 1) < 0.005, (fp32, int8)
