"""`bench throughput` on a tiny random model: the mixed workload runs with every request generating exactly
its own output length, the HF sweep records every configuration (a failing one with its error) and
compares loom with the best, and the compute-roof fractions are the JSON's own numbers combined."""

from __future__ import annotations

import pytest

from loom.bench import throughput
from loom.bench.workload import mixed_workload
from loom.config import CacheConfig, EngineConfig


@pytest.fixture(scope="module")
def result(tiny_folder):
    real_run = throughput.HFStatic.run

    def run(self, prompts, output_len, batch):  # one configuration runs out of memory
        if batch == 4 and self.model.dtype == throughput.torch.bfloat16:
            raise RuntimeError("out of memory (simulated)")
        return real_run(self, prompts, output_len, batch)

    patch = pytest.MonkeyPatch()
    patch.setattr(throughput.HFStatic, "run", run)
    try:
        yield throughput.run_throughput(
            EngineConfig(model=tiny_folder, cache=CacheConfig(memory_bytes=16 << 20)), dataset="mixed",
            num_prompts=6, input_range=(8, 64), output_range=(4, 16), seed=3, hf_batch=(2, 4),
            hf_dtype=("float32", "bfloat16"))
    finally:
        patch.undo()


def test_mixed_workload_each_request_generates_its_output_length(result, tiny_folder):
    from loom.tokenizer import load_tokenizer

    w = result["workload"]
    want = mixed_workload(6, load_tokenizer(tiny_folder), seed=3, input_range=(8, 64), output_range=(4, 16))
    assert result["dataset"] == "mixed" and result["input_len"] is None
    assert w["input_tokens"] == want.input_tokens and w["output_tokens"] == want.output_tokens
    assert w["output_lens"]["min"] >= 4 and w["output_lens"]["max"] <= 16 and w["input_lens"]["max"] <= 64
    loom = result["results"]["loom"]
    assert loom["output_len_mismatches"] == 0 and loom["output_tokens"] == want.output_tokens
    assert loom["prefix_cache_hits"] == 0 and loom["preemptions"] == 0


def test_the_hf_sweep_records_every_configuration_and_picks_the_best(result):
    configs = result["hf_configs"]
    assert [(c["dtype"], c["batch"]) for c in configs] == [("float32", 2), ("float32", 4), ("bfloat16", 2),
                                                           ("bfloat16", 4)]
    assert configs[3] == {"batch": 4, "dtype": "bfloat16", "error": "RuntimeError: out of memory (simulated)"}
    ok = configs[:3]
    for c in ok:  # each request's own output tokens only
        assert c["output_tokens"] == result["workload"]["output_tokens"] <= c["generated_tokens"]
    assert result["results"]["hf"] == max(ok, key=lambda c: c["total_tokens_per_s"])
    ratio = result["results"]["loom"]["total_tokens_per_s"] / result["results"]["hf"]["total_tokens_per_s"]
    assert result["loom_over_hf"]["total_tokens_per_s"] == pytest.approx(ratio)


def test_fraction_of_the_compute_roof(result):
    roof = result["compute_roof"]
    assert set(roof["peak_matmul_flops"]) == {"float32", "bfloat16"}
    assert roof["flops_per_token"] == pytest.approx(
        roof["workload_flops"] / (result["workload"]["input_tokens"] + result["workload"]["output_tokens"]))
    for r in [result["results"]["loom"], *result["hf_configs"][:3]]:
        want = roof["flops_per_token"] * r["total_tokens_per_s"] / roof["peak_matmul_flops"][r["dtype"]]
        assert r["fraction_of_compute_roof"] == pytest.approx(want) and 0 < want < 1


def test_resident_memory_and_weight_bytes_after_load(result):
    """The JSON gives the process's resident size before and after loading loom's model and the bytes its
    weights hold; the tiny fp32 model's weights are its parameters and buffers, counted once."""
    from loom import LLM
    from loom.bench.throughput import resident_bytes, weight_bytes

    memory = result["results"]["loom"]["memory"]
    assert memory["rss_before_load_mib"] > 0 and memory["rss_after_load_mib"] > 0
    # a tiny model adds almost nothing, and loading returns freed pages to the OS (malloc_trim), so in a
    # process that earlier tests grew to gigabytes "after" may sit a little below "before"
    assert memory["rss_after_load_mib"] >= memory["rss_before_load_mib"] - 64
    assert result["results"]["loom"]["weights"] == "native"
    assert resident_bytes() > 0
    model = LLM(result["model"], weights="fp32").model
    params = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers() if b is not None)
    assert weight_bytes(model) == params + buffers
    assert memory["weight_mib"] * 2**20 == pytest.approx(params + buffers)
