"""Device selection: cpu by default, cuda only where torch sees a GPU, the dtype each device defaults to."""

from __future__ import annotations

import pytest
import torch

from loom.config import ModelConfig
from loom.device import available_memory, default_dtype, module_device, resolve_device
from loom.engine.kv_cache import KVCache
from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer
from loom.weights.loader import choose_weights


def test_cpu_is_the_default_and_cuda_needs_a_gpu():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("mps")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_default_dtypes():
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    assert choose_weights(None, None) == ("native", torch.float32)
    assert choose_weights("fp32", None) == ("fp32", torch.float32)
    assert choose_weights(None, "bfloat16") == (None, "bfloat16")


def test_metadata_and_cache_follow_the_device():
    meta = AttentionMetadata(torch.arange(3), [0, 3], [3], torch.arange(3), torch.zeros(1, 1, dtype=torch.long))
    moved = meta.to("cpu")
    assert moved.query_start == [0, 3] and torch.equal(moved.slot_mapping, meta.slot_mapping)
    assert AttentionMetadata.uncached([2]).to("cpu").slot_mapping is None
    cfg = ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8)
    cache = KVCache(cfg, 2, 4, device="cpu")
    assert cache.device.type == "cpu" and cache.k.device.type == "cpu"
    assert module_device(Transformer(cfg)) == torch.device("cpu")
    assert available_memory("cpu") > 0


def test_llm_on_the_cpu_by_name_equals_the_default(tmp_path):
    from loom import LLM, SamplingParams
    from loom.tokenizer import tokenizer_from_gguf_metadata
    from tests.helpers import byte_level_metadata, save_tiny_hf

    save_tiny_hf(str(tmp_path), "llama", num_key_value_heads=2)
    tokenizer_from_gguf_metadata(byte_level_metadata()).save(str(tmp_path))
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    default, named = LLM(str(tmp_path)), LLM(str(tmp_path), device="cpu")
    assert named.device == torch.device("cpu") and named.model.dtype == torch.float32
    assert default.generate([[5, 6, 7]], p)[0].token_ids == named.generate([[5, 6, 7]], p)[0].token_ids


def test_cli_device_flag():
    from loom.cli import build_parser, main

    args = build_parser().parse_args(["bench", "throughput", "--device", "cuda"])
    assert args.device == "cuda"
    assert build_parser().parse_args(["generate", "hi"]).device == "cpu"
    if not torch.cuda.is_available():
        assert main(["generate", "hi", "--device", "cuda", "--model", "missing.gguf"]) == 2
