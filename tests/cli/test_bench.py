"""`loom bench ...` in-process on the default model, at small sizes."""

from __future__ import annotations

import json

import pytest

from tests.cli.helpers import run


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


def test_bench_load(capsys):
    code, out, _ = run(capsys, "bench", "load", "--peers", "none", "--repeats", "1", "--json")
    result = json.loads(out)
    assert code == 0 and result["results"]["loom"]["load_s"] > 0


def test_bench_throughput_json(capsys):
    code, out, _ = run(capsys, "bench", "throughput", "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
                       "--peers", "hf", "--hf-batch", "2,4", "--hf-dtype", "float32", "--kv-cache-memory", "64MiB",
                       "--json")
    result = json.loads(out)
    assert code == 0 and set(result["results"]) == {"loom", "hf"} and result["dataset"] == "fixed"
    loom = result["results"]["loom"]
    assert loom["output_tokens"] == 16 and result["results"]["hf"]["output_tokens"] == 16
    assert [c["batch"] for c in result["hf_configs"]] == [2, 4]
    assert 0 < loom["peak_kv_blocks"] <= loom["kv_blocks_total"] and 0 <= loom["kv_waste_mean"] < 1
    assert result["loom_over_hf"]["total_tokens_per_s"] > 0 and 0 < loom["fraction_of_compute_roof"] < 1
    assert result["workload"]["input_lens"]["total"] == 64


def test_bench_throughput_mixed_table(capsys, tiny_gguf):
    code, out, _ = run(capsys, "bench", "throughput", "--model", tiny_gguf, "--weights", "fp32", "--dataset", "mixed",
                       "--num-prompts", "3", "--input-range", "8,32", "--output-range", "2,6", "--seed", "1",
                       "--peers", "none", "--kv-cache-memory", "16MiB")
    assert code == 0 and out.startswith("mixed workload: 3 requests,") and "of the float32 compute roof" in out
    code, _, err = run(capsys, "bench", "throughput", "--hf-dtype", "float8")
    assert code == 2 and "--hf-dtype takes float32, bfloat16, float16" in err
    code, _, err = run(capsys, "bench", "throughput", "--dataset", "mixed", "--input-range", "64")
    assert code == 2 and "MIN,MAX" in err


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


def test_bench_kv_eviction_json(capsys):
    """The full-cache row is the model's own perplexity over the same tokens (one window of the GPTQ
    protocol), and every bounded row has its buckets."""
    from loom import LLM
    from loom.eval.corpora import read_corpus
    from loom.eval.perplexity import perplexity

    # fp32: the same numerics token by token and over the whole window (the native 4-bit path computes
    # products of more than 32 rows in bf16, and single rows in fp32)
    code, out, _ = run(capsys, "bench", "kv-eviction", "--tokens", "64", "--budgets", "0.25", "--bucket", "32",
                       "--weights", "fp32", "--json")
    result = json.loads(out)
    assert code == 0 and result["tokens_scored"] == 63
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == {"full", "window 16", "streaming 16, 4 sinks", "h2o 16, 8 recent"}
    assert all(len(r["buckets"]) == 2 for r in rows.values())
    llm = LLM(weights="fp32")
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


def test_bench_latency_structured(capsys, tmp_path):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 6, "maxItems": 6}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    code, out, _ = run(capsys, "bench", "latency", "--prompt-len", "8", "--gen-len", "32", "--repeats", "1",
                       "--peers", "none", "--structured", str(path), "--json")
    result = json.loads(out)
    constrained = result["results"]["loom-structured"]
    assert code == 0 and constrained["schema"] == schema and constrained["decode_tokens_per_s"] > 0
    assert constrained["decode_vs_unconstrained"] > 0 and constrained["mask_us_per_token"] > 0
    code, _, err = run(capsys, "bench", "latency", "--structured", "{not json")
    assert code == 2 and "--structured" in err
