"""The option groups and their one mapping onto the EngineConfig, without loading a model."""

from __future__ import annotations

import argparse

import pytest

from loom.cli import COMMANDS, build_parser
from loom.cli.options import engine_config
from loom.config import CacheConfig, EngineConfig, KVPolicyConfig, RopeScaling, SchedulerConfig, SpeculativeConfig


def test_every_command_registers_and_runs():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subparsers.choices) == list(COMMANDS)
    for module in COMMANDS.values():
        assert callable(module.register) and callable(module.run) and module.__doc__


def test_defaults_give_the_engines_defaults():
    cfg = engine_config(build_parser().parse_args(["generate", "hi"]))
    assert cfg == EngineConfig(device="cpu")
    assert cfg.cache == CacheConfig() and cfg.scheduler == SchedulerConfig() and cfg.decode_step == "auto"
    assert cfg.weights is cfg.dtype is cfg.num_threads is cfg.model is None
    assert cfg.speculative is cfg.kv_policy is cfg.rope_scaling is None


def test_options_reach_their_configs():
    args = build_parser().parse_args([
        "serve", "--weights", "bf16", "--threads", "2", "--kv-cache-memory", "1MiB", "--block-size", "8",
        "--no-prefix-caching", "--kv-cache-dtype", "int8", "--max-num-seqs", "3", "--max-num-batched-tokens", "64",
        "--no-chunked-prefill", "--max-model-len", "128", "--max-waiting", "5", "--kv-policy", "window",
        "--kv-budget", "32", "--speculative", "ngram", "--num-speculative-tokens", "2",
        "--rope-scaling", "linear", "--rope-factor", "2", "--decode-step", "scripted", "--model", "m.gguf"])
    cfg = engine_config(args)
    assert cfg.weights == "bf16" and cfg.num_threads == 2 and cfg.decode_step == "scripted" and cfg.model == "m.gguf"
    assert cfg.cache == CacheConfig(block_size=8, memory_bytes=1 << 20, enable_prefix_caching=False,
                                        kv_dtype="int8")
    assert cfg.scheduler == SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64,
                                                enable_chunked_prefill=False, max_model_len=128, max_waiting=5)
    assert cfg.kv_policy == KVPolicyConfig("window", 32)
    assert isinstance(cfg.speculative, SpeculativeConfig) and cfg.speculative.num_tokens == 2
    assert cfg.rope_scaling == RopeScaling("linear", 2.0)


def test_bad_values_are_errors():
    with pytest.raises(ValueError, match="cannot read a size"):
        engine_config(build_parser().parse_args(["chat", "--kv-cache-memory", "lots"]))


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"], ["bench", "throughput"]])
def test_memory_budget_reaches_the_engine_config(command):
    cfg = engine_config(build_parser().parse_args([*command, "--memory-budget", "300M", "--stream-buffers", "3"]))
    assert cfg.memory_budget == 300 * 2**20 and cfg.stream_buffers == 3
    cfg = engine_config(build_parser().parse_args([*command, "--memory-budget", "1.5G"]))
    assert cfg.memory_budget == int(1.5 * 2**30) and cfg.stream_buffers == 2
    assert engine_config(build_parser().parse_args(command)).memory_budget is None
