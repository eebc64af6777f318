"""`loom eval context`: per-position NLL and its buckets against direct computations, on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loom.config import ModelConfig, RopeScaling
from loom.eval.context import bucket_sums, method_scaling, position_nll, run_context
from loom.eval.perplexity import perplexity
from loom.models.transformer import Transformer
from tests.helpers import byte_level_vocab_meta, save_tiny_hf, write_llama_gguf

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                     max_position_embeddings=32)


def test_position_nll_equals_full_log_softmax():
    model = Transformer(CONFIG).init_random(seed=1, std=0.2)
    ids = torch.randint(0, 64, (50,), generator=torch.Generator().manual_seed(0))
    got = position_nll(model, ids, rows=7)  # logits in chunks of 7 rows
    logprobs = torch.log_softmax(model.logits(ids).double(), dim=-1)
    want = torch.tensor([-logprobs[t - 1, ids[t]].item() for t in range(1, 50)], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bucket_sums():
    nll = torch.arange(1, 11, dtype=torch.float64)  # targets at positions 1..10
    sums, counts = bucket_sums(nll, 4)  # positions [0,4): 1..3, [4,8): 4..7, [8,12): 8..10
    assert counts == [3, 4, 3] and sums == [1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9 + 10]


def test_method_scaling():
    assert method_scaling("none", 2.0, None) == "none"
    assert method_scaling("yarn", 2.0, 8192) == RopeScaling("yarn", 2.0, 8192)
    with pytest.raises(ValueError, match="unknown method"):
        method_scaling("dynamic", 2.0, None)


def test_run_context_on_a_tiny_gguf(tmp_path):
    hf = save_tiny_hf(str(tmp_path / "hf"), "llama", num_key_value_heads=2, max_position_embeddings=32,
                      initializer_range=0.1)
    path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(path, hf, "F32", tokenizer_meta=byte_level_vocab_meta())
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(32 + (5 * i + 1) % 95) for i in range(200)))  # 200 byte tokens
    out = tmp_path / "context.json"
    result = run_context(path, methods=["none", "linear"], factor=2.0, window=64, windows=2, bucket=16,
                         corpus=str(text), progress=False, out=str(out))
    assert json.loads(out.read_text())["results"].keys() == {"none", "linear"}
    assert result["trained_context"] == 32 and result["tokens_total"] == 200
    none, linear = result["results"]["none"], result["results"]["linear"]
    assert none["bucket_tokens"] == [2 * 15, 2 * 16, 2 * 16, 2 * 16]
    assert linear["rope_scaling"]["kind"] == "linear" and linear["rope_scaling"]["original_max_position"] == 32
    # Each window's buckets add up to the window NLL of the perplexity module (positions from 0, same model).
    from loom.tokenizer import load_tokenizer
    from loom.weights.loader import load_model

    loaded = load_model(path, weights="fp32", rope_scaling=RopeScaling("linear", 2.0))
    ids = load_tokenizer(path, loaded.metadata, loaded.config.eos_token_ids).encode(text.read_text())
    ppl = perplexity(loaded.model, ids, 64, max_tokens=128, progress=False)
    for w in range(2):
        assert math.fsum(linear["window_bucket_nll_sum"][w]) == pytest.approx(ppl.window_nll[w], rel=1e-6)
    assert none["bucket_mean_nll"] != pytest.approx(linear["bucket_mean_nll"], rel=1e-3)  # the methods differ
