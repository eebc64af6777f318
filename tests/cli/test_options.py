"""The option groups and their one mapping onto LLM's keyword arguments, without loading a model."""

from __future__ import annotations

import argparse
import inspect

import pytest

from loom.cli import COMMANDS, build_parser
from loom.cli.options import engine_options
from loom.config import CacheConfig, KVPolicyConfig, RopeScaling, SchedulerConfig, SpeculativeConfig
from loom.llm import LLM


def test_every_command_registers_and_runs():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subparsers.choices) == list(COMMANDS)
    for module in COMMANDS.values():
        assert callable(module.register) and callable(module.run) and module.__doc__


def test_defaults_give_the_engines_defaults():
    opts = engine_options(build_parser().parse_args(["generate", "hi"]))
    assert set(opts) <= set(inspect.signature(LLM).parameters)
    assert opts["cache"] == CacheConfig() and opts["scheduler"] == SchedulerConfig()
    assert opts["weights"] is opts["dtype"] is opts["num_threads"] is None
    assert opts["speculative"] is opts["kv_policy"] is opts["rope_scaling"] is None and opts["device"] == "cpu"


def test_options_reach_their_configs():
    args = build_parser().parse_args([
        "serve", "--weights", "bf16", "--threads", "2", "--kv-cache-memory", "1MiB", "--block-size", "8",
        "--no-prefix-caching", "--kv-cache-dtype", "int8", "--max-num-seqs", "3", "--max-num-batched-tokens", "64",
        "--no-chunked-prefill", "--max-model-len", "128", "--max-waiting", "5", "--kv-policy", "window",
        "--kv-budget", "32", "--speculative", "ngram", "--num-speculative-tokens", "2",
        "--rope-scaling", "linear", "--rope-factor", "2"])
    opts = engine_options(args)
    assert opts["weights"] == "bf16" and opts["num_threads"] == 2
    assert opts["cache"] == CacheConfig(block_size=8, memory_bytes=1 << 20, enable_prefix_caching=False,
                                        kv_dtype="int8")
    assert opts["scheduler"] == SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64,
                                                enable_chunked_prefill=False, max_model_len=128, max_waiting=5)
    assert opts["kv_policy"] == KVPolicyConfig("window", 32)
    assert isinstance(opts["speculative"], SpeculativeConfig) and opts["speculative"].num_tokens == 2
    assert opts["rope_scaling"] == RopeScaling("linear", 2.0)


def test_bad_values_are_errors():
    with pytest.raises(ValueError, match="cannot read a size"):
        engine_options(build_parser().parse_args(["chat", "--kv-cache-memory", "lots"]))
