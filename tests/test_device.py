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


MEMINFO = "MemTotal:       24000000 kB\nMemFree:          500000 kB\nMemAvailable:   20000000 kB\nCached:  19000000 kB\n"


def test_host_memory_is_memavailable_capped_by_the_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    no_cgroup = str(tmp_path / "none")
    # a warm page cache leaves little free memory, but nearly all of it is available
    assert available_memory("cpu", str(meminfo), no_cgroup) == 20_000_000 * 1024
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{8 << 30}\n")
    (v2 / "memory.current").write_text(f"{3 << 30}\n")
    assert available_memory("cpu", str(meminfo), str(v2)) == 5 << 30
    (v2 / "memory.max").write_text("max\n")  # no limit
    assert available_memory("cpu", str(meminfo), str(v2)) == 20_000_000 * 1024
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{4 << 30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    assert available_memory("cpu", str(meminfo), str(tmp_path / "v1")) == 3 << 30


def test_default_kv_cache_holds_the_whole_context_when_memory_allows(monkeypatch):
    import loom.engine.kv_cache as kv_cache
    from loom.config import CacheConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=8192)
    per_block = KVCache.bytes_per_block(cfg, 16)
    whole = 8192 // 16
    # 10% of what is available holds 200 blocks; the whole context (512 blocks) fits in half of it
    monkeypatch.setattr(kv_cache, "available_memory", lambda device=None: 2000 * per_block)
    assert KVCache.from_config(cfg, CacheConfig(), context=8192).num_blocks == whole
    assert KVCache.from_config(cfg, CacheConfig()).num_blocks == 200  # no context given: the fraction alone
    # too little memory for the whole context: the fraction, as before
    monkeypatch.setattr(kv_cache, "available_memory", lambda device=None: 600 * per_block)
    assert KVCache.from_config(cfg, CacheConfig(), context=8192).num_blocks == 60
    # explicit budgets are kept as given
    assert KVCache.from_config(cfg, CacheConfig(num_blocks=7), context=8192).num_blocks == 7
    assert KVCache.from_config(cfg, CacheConfig(memory_bytes=3 * per_block), context=8192).num_blocks == 3
