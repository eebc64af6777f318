"""`loom bench moe` on a tiny model: the MoE and dense twins have equal active parameters, both run through the
engine, and the dispatch breakdown names its parts."""

from __future__ import annotations

from loom.bench.moe import bench_configs, byte_tokenizer, run_moe_bench


def test_dense_twin_has_the_moe_models_active_parameters():
    moe, dense = bench_configs(64, 2, 2, 1, experts=8, top_k=2, moe_ff=32, vocab=300, shared_ff=16)
    router = 2 * 8 * 64  # the only active weights the dense twin lacks (and the shared expert's gate)
    assert moe.num_parameters(active=True) - dense.num_parameters() == router + 2 * 64
    assert moe.num_parameters() > 3 * moe.num_parameters(active=True) // 2
    assert byte_tokenizer(300).decode([72, 105]) == "Hi"


def test_tiny_run_reports_speeds_and_dispatch():
    r = run_moe_bench(hidden=64, layers=1, heads=2, kv_heads=1, experts=4, top_k=2, moe_ff=32, vocab=300, batch=2,
                      prompt_len=8, gen_len=3, repeats=1)
    assert set(r["engine"]) == {"moe", "dense"} and r["engine"]["moe"]["decode_step"] == "scripted"
    assert all(v > 0 for v in r["moe_over_dense"].values())
    assert sorted(r["dispatch_ms"], key=int) == ["1", "2", "16"]
    d = r["dispatch_ms"]["16"]
    assert d["dispatch"] > 0 and d["experts"] > 0 and d["experts_hit"] <= 4
