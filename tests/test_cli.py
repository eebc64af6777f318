"""The `loom` command, run in-process on the default model."""

from __future__ import annotations

import json

import pytest

from loom.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys):
    code, out, _ = run(capsys, "generate", "The capital of France is", "--temperature", "0", "--max-tokens", "6",
                       "--json")
    assert code == 0
    result = json.loads(out)
    assert result["prompt_token_ids"] == [504, 3575, 282, 4649, 314]
    assert len(result["token_ids"]) == 6 and result["finish_reason"] == "length"
    assert result["text"].startswith(" Paris")
    assert {"prefill_s", "decode_tokens_per_s", "load_s"} <= set(result["timings"])


def test_generate_streams_chat_and_prints_speed(capsys):
    code, out, err = run(capsys, "generate", "What is the capital of France?", "--chat", "--temperature", "0",
                         "--max-tokens", "20")
    assert code == 0 and "Paris" in out and "tok/s" in err


def test_info(capsys):
    code, out, _ = run(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0 and info["parameters"] == 134_515_008
    assert info["kv_bytes_per_token"]["fp32"] == 30 * 3 * 64 * 2 * 4
    assert info["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    code, out, _ = run(capsys, "info")
    assert "GiB" in out and "KV per token" in out


def test_bench_latency_json(capsys):
    code, out, _ = run(capsys, "bench", "latency", "--prompt-len", "8", "--gen-len", "8", "--repeats", "1",
                       "--peers", "hf,eager,scripted", "--json")
    result = json.loads(out)
    assert code == 0 and set(result["results"]) == {"loom", "loom-eager", "loom-scripted", "hf"}
    steps = {name: r["decode_step"] for name, r in result["results"].items() if name.startswith("loom")}
    assert steps == {"loom": "native", "loom-eager": "module", "loom-scripted": "scripted"}  # 4-bit weights
    assert result["results"]["loom"]["decode_steps"].startswith("native (decode batches of <= 32) > scripted")
    for r in result["results"].values():
        assert r["decode_tokens_per_s"] > 0 and 0 < r["fraction_of_limit"] < 1.5
    assert result["speedup"]["hf"]["decode"] > 0 and result["memory_bandwidth_GBps"] > 0


@pytest.mark.parametrize("argv,msg", [(["generate", "x", "--model", "/nonexistent.gguf"], "no such file"),
                                      (["generate", "x", "--max-tokens", "0"], "max_tokens"),
                                      (["bench", "latency", "--batch", "2", "--peers", "none"], "batch 1")])
def test_errors_exit_2_with_a_message(capsys, argv, msg):
    code, _, err = run(capsys, *argv)
    assert code == 2 and msg in err


def test_chat_is_interactive_and_keeps_the_conversation():
    import subprocess
    import sys

    lines = "What is the capital of France?\nAnd of Italy?\n/reset\n/exit\n"
    proc = subprocess.run([sys.executable, "-m", "loom.cli", "chat", "--temperature", "0", "--max-tokens", "24"],
                          input=lines, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "Rome" in proc.stdout  # the second answer used the first turn
    assert proc.stderr.count("decode") == 2  # one speed line per answer


def test_bench_load(capsys):
    code, out, _ = run(capsys, "bench", "load", "--peers", "none", "--repeats", "1", "--json")
    result = json.loads(out)
    assert code == 0 and result["results"]["loom"]["load_s"] > 0


def test_bench_throughput_json(capsys):
    code, out, _ = run(capsys, "bench", "throughput", "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
                       "--peers", "hf", "--kv-cache-memory", "64MiB", "--json")
    result = json.loads(out)
    assert code == 0 and set(result["results"]) == {"loom", "hf"}
    loom = result["results"]["loom"]
    assert loom["output_tokens"] == 16 and result["results"]["hf"]["output_tokens"] == 16
    assert 0 < loom["peak_kv_blocks"] <= loom["kv_blocks_total"] and 0 <= loom["kv_waste_mean"] < 1
    assert result["loom_over_hf"]["total_tokens_per_s"] > 0


def test_engine_options_and_cache_report(capsys):
    code, out, err = run(capsys, "generate", "Hi", "--temperature", "0", "--max-tokens", "3", "--kv-cache-memory",
                         "32MiB", "--block-size", "8", "--no-prefix-caching", "--max-num-seqs", "4")
    assert code == 0 and "KV cache:" in err and "blocks of 8 tokens" in err
    code, _, err = run(capsys, "generate", "Hi", "--kv-cache-memory", "lots")
    assert code == 2 and "cannot read a size" in err


def test_bench_serve_json(capsys):
    code, out, _ = run(capsys, "bench", "serve", "--concurrency", "2", "--num-prompts", "4", "--input-len", "8",
                       "--output-len", "4", "--kv-cache-memory", "64MiB", "--repeats", "1", "--json")
    result = json.loads(out)
    http = result["results"]["http"]
    assert code == 0 and http["completed"] == 4 and http["failed"] == 0
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(http[name]) == {"mean", "p50", "p99"} and http[name]["p50"] > 0
    assert http["ttft_s"]["mean"] < http["e2e_s"]["mean"]
    assert result["http_over_offline"] > 0


def test_generate_with_speculative_decoding_equals_plain(capsys):
    argv = ["generate", "Repeat: the quick brown fox jumps over the lazy dog. Repeat: the quick brown fox",
            "--temperature", "0", "--max-tokens", "12", "--json"]
    code, out, _ = run(capsys, *argv)
    plain = json.loads(out)["token_ids"]
    for extra in (["--speculative", "ngram"], ["--speculative", "window", "--spec-window", "8"]):
        code, out, _ = run(capsys, *argv, *extra, "--num-speculative-tokens", "3")
        assert code == 0 and json.loads(out)["token_ids"] == plain


def test_bench_latency_speculative_json(capsys):
    code, out, _ = run(capsys, "bench", "latency", "--speculative", "ngram,window", "--gen-len", "8",
                       "--repeats", "1", "--spec-prompts", "copy", "--json")
    result = json.loads(out)
    assert code == 0 and set(result["methods"]) == {"ngram", "window"}
    row = result["results"]["copy"]
    for m in ("ngram", "window"):
        assert row[m]["speedup"] > 0 and row[m]["same_tokens_as_plain"] is True
        assert 0 <= row[m]["acceptance_rate"] <= 1 and row[m]["tokens_per_pass"] >= 1
    code, _, err = run(capsys, "bench", "latency", "--speculative", "beam")
    assert code == 2 and "ngram" in err


def test_kv_policy_options(capsys):
    code, out, _ = run(capsys, "generate", "The history of England", "--temperature", "0", "--max-tokens", "40",
                       "--kv-policy", "streaming", "--kv-budget", "24", "--kv-prefill-chunk", "8", "--json")
    assert code == 0 and len(json.loads(out)["token_ids"]) == 40
    code, _, err = run(capsys, "generate", "Hi", "--kv-policy", "h2o")
    assert code == 2 and "budget" in err


def test_bench_kv_eviction_json(capsys):
    """The full-cache row is the model's own perplexity over the same tokens (one window of the GPTQ
    protocol), and every bounded row has its buckets."""
    from loom import LLM
    from loom.eval.corpora import read_corpus
    from loom.eval.perplexity import perplexity

    code, out, _ = run(capsys, "bench", "kv-eviction", "--tokens", "64", "--budgets", "0.25", "--bucket", "32",
                       "--json")
    result = json.loads(out)
    assert code == 0 and result["tokens_scored"] == 63
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == {"full", "window 16", "streaming 16, 4 sinks", "h2o 16, 8 recent"}
    assert all(len(r["buckets"]) == 2 for r in rows.values())
    llm = LLM()
    ids = llm.tokenizer.encode(read_corpus("britannica"))[:64]
    reference = perplexity(llm.model, ids, 64, max_tokens=64, progress=False).perplexity
    assert rows["full"]["perplexity"] == pytest.approx(reference, rel=1e-4)


def test_bench_streaming_memory_is_constant(capsys):
    code, out, _ = run(capsys, "bench", "streaming", "--generate", "120", "--budget", "32", "--every", "40", "--json")
    result = json.loads(out)
    assert code == 0 and result["generated"] == 120
    # a 5-token prompt, then one token per step: budget + 1 = 33 slots = 3 blocks once 32 tokens are held
    assert [t["kv_blocks"] for t in result["trace"]] == [3, 3, 3]
    assert result["kv_bytes_held_at_end"] < result["kv_bytes_a_full_cache_would_hold"]
    assert result["bounded_tokens_per_s_at_budget"] > 0 and result["plain_tokens_per_s_at_budget"] > 0
