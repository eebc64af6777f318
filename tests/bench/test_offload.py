"""`loom bench offload` end to end on a tiny model (a smoke run: every row, no timing claims), and its parts."""

from __future__ import annotations

import os

import pytest

from loom.analysis.offload import choose_speculative_tokens
from loom.analysis.speculative import expected_tokens
from loom.bench.offload import budget_for, plot_offload, run_offload, storage_bandwidth
from tests.helpers import byte_level_vocab_meta, save_tiny_hf, write_llama_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-offload")
    hf = save_tiny_hf(str(root / "hf"), "llama", num_key_value_heads=2, num_hidden_layers=6)
    path = str(root / "tiny-Q8_0.gguf")
    write_llama_gguf(path, hf, "Q8_0", tokenizer_meta=byte_level_vocab_meta())
    return path, str(root / "hf")


def test_offload_sweep_runs_every_row(tiny, tmp_path):
    path, hf_folder = tiny
    result = run_offload(path, fractions=(0.25,), methods=("none", "ngram"), gen_len=8, kv_bytes=1 << 20,
                         peers=("accelerate",), hf_folder=hf_folder, bandwidth_bytes=1 << 20)
    assert result["storage"]["bytes_per_s"] > 0 and result["storage"]["mode"] in ("O_DIRECT",
                                                                                "pread + posix_fadvise(DONTNEED)")
    loom = [r for r in result["rows"] if r["system"] == "loom"]
    peer = [r for r in result["rows"] if r["system"] == "accelerate"]
    assert [r["method"] for r in loom] == ["none", "ngram"] and len(peer) == 1
    for r in loom:
        assert "error" not in r, r.get("error")
        assert r["tokens"] == 8 and r["plan"]["streamed_layers"] and r["describe"].count("streamed")
        assert r["bytes_read_per_token"] > 0 and r["peak_rss"] > r["baseline_rss"]
        assert r["floor_s_per_token"] > 0 and r["budget"] >= r["plan"]["planned_bytes"]
        # peak RSS against the budget plus the named overheads, each measured
        o = r["overheads"]
        assert set(o) == {"runtime", "tokenizer", "load_residue", "first_generation"}
        assert o["runtime"] == r["baseline_rss"] and o["tokenizer"] == r["tokenizer_rss"] and o["load_residue"] >= 0
        assert r["peak_over_budget_and_overheads"] == r["peak_rss"] - r["budget"] - sum(o.values())
        assert r["peak_within_budget_and_overheads"] == (r["peak_over_budget_and_overheads"] <= 0)
        assert r["generation_rss"]["peak_over_after_load"] == r["peak_rss"] - r["rss_after_load"]
        t = r["per_token_s"]  # the stream's time per token: read and filled in place, computed, waited for
        assert set(t) == {"read", "fill", "build", "compute", "wait"}
        assert t["read"] > 0 and t["fill"] > 0 and t["compute"] > 0  # (build: each slot's first layer)
    assert loom[0]["token_ids"] == loom[1]["token_ids"]  # speculation changes the speed, not the tokens
    assert "speculation" not in loom[0]
    sp = loom[1]["speculation"]  # k chosen by the formula from the warm-up's acceptance and the measured bandwidth
    assert sp["chosen_by"] == "formula" and 1 <= sp["k"] <= 16 and loom[1]["num_speculative_tokens"] == sp["k"]
    warm, plan = sp["warmup"], loom[1]["plan"]
    again = choose_speculative_tokens(plan["streamed_bytes_per_forward"], result["storage"]["bytes_per_s"],
                                      warm["acceptance"], warm["draft_step_s"], warm["target_compute_s"])
    assert again.k == sp["k"] and warm["warmup_passes"] > 0 and 0 < warm["acceptance"] < 1
    assert sp["choice"]["pass_read_s"] == pytest.approx(plan["streamed_bytes_per_forward"]
                                                        / result["storage"]["bytes_per_s"])
    assert "measured_acceptance" in sp, (sp, loom[1]["speculative"])
    assert 0 <= sp["measured_acceptance"] <= 1 and 1 <= sp["tokens_per_pass"] <= sp["k"] + 1
    assert sp["formula_tokens_per_pass"] == pytest.approx(expected_tokens(sp["k"], sp["measured_acceptance"]))
    assert "error" not in peer[0], peer[0].get("error")
    assert peer[0]["token_ids"] == loom[0]["token_ids"]  # transformers + accelerate on the same weights (Q8_0 vs fp32
    # could differ in a near tie; this tiny model's greedy path does not)
    plot_offload(result, str(tmp_path / "offload.png"))
    assert os.path.getsize(tmp_path / "offload.png") > 0


def test_budget_shares():
    plan = {"planned_bytes": 1000, "minimum_bytes": 400, "layer_bytes": [100] * 6}
    assert budget_for(plan, 1.0) == 1000 and budget_for(plan, 0.5) == 700 and budget_for(plan, 0.0) == 400


def test_storage_bandwidth_reads_the_file(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(1 << 20))
    probe = storage_bandwidth(str(blob), nbytes=1 << 20, chunk=1 << 18)
    assert probe["bytes"] >= 1 << 20 and probe["bytes_per_s"] > 0


def test_user_k_wins(tiny):
    path, _ = tiny
    result = run_offload(path, fractions=(0.25,), methods=("ngram",), num_tokens=2, gen_len=2, kv_bytes=1 << 20,
                         peers=(), bandwidth_bytes=1 << 20)
    row = result["rows"][0]
    assert "error" not in row, row.get("error")
    assert row["speculation"]["k"] == 2 and row["speculation"]["chosen_by"] == "user"
    assert "choice" not in row["speculation"] and row["num_speculative_tokens"] == 2  # what the engine ran
