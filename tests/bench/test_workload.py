"""The throughput benchmark's workloads: mixed lengths reproducible from the seed and inside their ranges,
prompts that are consecutive slices of the corpus, and the FLOPs a workload costs."""

from __future__ import annotations

import math
import statistics

import pytest

from loom.analysis.roofline import forward_ops
from loom.bench.workload import (CORPUS, CORPUS_OFFSET, corpus_slices, fixed_workload, lognormal_lengths,
                                 lognormal_parameters, mixed_workload, workload_flops)
from loom.config import ModelConfig


def test_lognormal_lengths_are_reproducible_in_range_and_long_tailed():
    a = lognormal_lengths(500, 16, 1024, "s0")
    assert a == lognormal_lengths(500, 16, 1024, "s0") and a != lognormal_lengths(500, 16, 1024, "s1")
    assert a[:50] == lognormal_lengths(50, 16, 1024, "s0")  # more requests do not change the first ones
    assert all(16 <= n <= 1024 for n in a) and 16 in a and 1024 in a  # clipped at both ends
    assert statistics.mean(a) > statistics.median(a)  # the long tail
    assert abs(statistics.median(a) / 128 - 1) < 0.2  # the median sits at sqrt(16 x 1024)
    p = lognormal_parameters(16, 1024)
    assert p["median"] == pytest.approx(128) and p["sigma"] == pytest.approx(math.log(64) / 4)
    with pytest.raises(ValueError):
        lognormal_parameters(64, 16)


def test_corpus_slices_are_consecutive_and_wrap_to_the_offset():
    slices, passes = corpus_slices(list(range(10)), [4, 4, 3], offset=2)
    assert slices == [[2, 3, 4, 5], [6, 7, 8, 9], [2, 3, 4]] and passes == 2


def test_mixed_workload_is_real_text_from_the_seed():
    from loom.eval.corpora import read_corpus
    from loom.tokenizer import tokenizer_from_gguf_metadata
    from tests.helpers import byte_level_metadata

    tok = tokenizer_from_gguf_metadata(byte_level_metadata())
    w = mixed_workload(20, tok, seed=7, input_range=(8, 64), output_range=(4, 16))
    again = mixed_workload(20, tok, seed=7, input_range=(8, 64), output_range=(4, 16))
    assert (w.prompts, w.output_lens) == (again.prompts, again.output_lens)
    assert mixed_workload(20, tok, seed=8, input_range=(8, 64), output_range=(4, 16)).output_lens != w.output_lens
    assert all(8 <= len(p) <= 64 for p in w.prompts) and all(4 <= o <= 16 for o in w.output_lens)
    text = tok.encode(read_corpus(CORPUS), add_special_tokens=False)
    assert sum(w.prompts, []) == text[CORPUS_OFFSET:CORPUS_OFFSET + w.input_tokens]
    d = w.description
    assert d["corpus_offset"] == CORPUS_OFFSET and d["corpus_passes"] == 1
    assert d["input_lens"]["total"] == w.input_tokens and d["output_lens"]["max"] == max(w.output_lens)
    assert d["input_distribution"]["mu"] == pytest.approx(math.log(math.sqrt(8 * 64)))


def test_fixed_workload_is_todays_random_ids():
    w = fixed_workload(3, 5, 4, vocab=50, seed=1, avoid=(0, 1))
    assert [len(p) for p in w.prompts] == [5, 5, 5] and w.output_lens == [4, 4, 4]
    assert not {0, 1} & set(sum(w.prompts, [])) and w.description["output_lens"]["total"] == 12


def test_workload_flops_is_prefill_plus_each_decode_at_its_context():
    c = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)
    f = lambda phase, n, l: sum(o.total_flops for o in forward_ops(c, phase, n, l))  # noqa: E731
    # 3 prompt tokens, 1 output (the prefill samples it); 5 prompt tokens, 3 outputs (two decodes, at 6 and 7)
    want = f("prefill", 3, 3) + f("prefill", 5, 5) + f("decode", 1, 6) + f("decode", 1, 7)
    assert workload_flops(c, [3, 5], [1, 3]) == pytest.approx(want)
