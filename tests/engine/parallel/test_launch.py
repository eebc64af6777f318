"""Entering a tensor-parallel world: torchrun with two "nodes" on loopback running `loom generate`, a quantized
GGUF cut on group boundaries, and the clear errors (indivisible heads, a torchrun world of the wrong size,
options that cannot run tensor-parallel)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from loom import LLM, SamplingParams
from loom.config import CacheConfig
from loom.layers.parallel import ShardingError
from tests.engine.parallel.test_engine import assert_same
from tests.helpers import byte_level_vocab_meta, save_tiny_hf, tiny_llama_folder, write_llama_gguf

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
                   "src")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return tiny_llama_folder(str(tmp_path_factory.mktemp("tp-launch") / "llama"), seed=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_on_loopback(tiny_path):
    """Two torchrun agents (node ranks 0 and 1, one process each) rendezvous over TCP on 127.0.0.1 and run the
    same `loom generate`: rank 0 prints the completion, rank 1 serves its shard and exits 0."""
    port = free_port()
    cli = ["-m", "loom.cli", "generate", "Hello tensor parallel", "--model", tiny_path, "--tensor-parallel-size",
           "2", "--temperature", "0", "--max-tokens", "24", "--ignore-eos", "--json", "--kv-cache-memory", "4MiB",
           "--tp-timeout", "30"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               *cli], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    result = json.loads(outs[0][0].strip().splitlines()[-1])
    assert outs[1][0].strip() == ""  # rank 1 prints nothing
    ref = LLM(tiny_path, cache=CacheConfig(memory_bytes=4 << 20)).generate(
        "Hello tensor parallel", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert result["token_ids"] == ref.outputs[0].token_ids and len(ref.outputs[0].token_ids) == 24


def test_quantized_gguf_cut_on_group_boundaries(tmp_path):
    """A Q8_0 GGUF (groups of 32) runs quantized on each rank: the same tokens and logprobs as one process."""
    hf = save_tiny_hf(str(tmp_path / "hf"), num_key_value_heads=2, seed=7)
    path = str(tmp_path / "q8.gguf")
    write_llama_gguf(path, hf, "Q8_0", tokenizer_meta=byte_level_vocab_meta())
    prompts = [[3, 4, 5, 6], [100, 7, 8], list(range(20, 40))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    single = LLM(path, cache=CacheConfig(num_blocks=64))
    ref = single.generate(prompts, params)
    llm = LLM(path, tensor_parallel_size=2, cache=CacheConfig(num_blocks=64))
    try:
        from loom.layers.quantized import QuantizedLinear

        o_proj = llm.model.layers[0].attn.o_proj
        assert isinstance(o_proj.inner, QuantizedLinear) and o_proj.inner.in_features == 32
        assert isinstance(llm.model.layers[0].attn.qkv_proj, QuantizedLinear)
        assert_same(ref, llm.generate(prompts, params))
    finally:
        llm.shutdown()


def test_indivisible_heads_are_refused_before_any_process_starts(tiny_path):
    with pytest.raises(ShardingError, match="4 attention heads are not divisible by the tensor-parallel size 3"):
        LLM(tiny_path, tensor_parallel_size=3)


def test_a_torchrun_world_of_another_size_is_refused(tiny_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="torchrun started a world of 4 processes .* tensor-parallel size is 2"):
        LLM(tiny_path, tensor_parallel_size=2)


@pytest.mark.parametrize("option,words", [
    (dict(decode_step="native"), "decode step 'native' cannot be chosen under tensor parallelism"),
    (dict(cache=CacheConfig(kv_dtype="int8")), "int8 KV cache is not supported"),
])
def test_unsupported_options_are_refused(tiny_path, option, words):
    with pytest.raises(ValueError, match=words):
        LLM(tiny_path, tensor_parallel_size=2, **option)


def test_unsupported_model_is_refused(tmp_path):
    from tests.helpers import save_tiny_moe

    save_tiny_moe(str(tmp_path), "mixtral")
    with pytest.raises(ShardingError, match="mixture-of-experts models are not supported"):
        LLM(str(tmp_path), tensor_parallel_size=2)
