"""Hardware presets, model resolution, and the probe of this machine."""

from __future__ import annotations

import math

import pytest

from loom.analysis.presets import HARDWARE, MODELS, custom_hardware, get_hardware, resolve_model
from loom.analysis.probe import measure_gemv_bandwidth, measure_matmul_flops, probe


def test_seed002_rtx4060_figures_and_the_real_card():
    """Seed 002: 15.39 TFLOPs and ~768 GBps, "compute 20-30x the bandwidth". 768 GB/s is not a 4060's:
    its 128-bit GDDR6 at 17 Gbps gives 272 GB/s (ridge ~56 FLOP/byte), which only strengthens the point."""
    seed = HARDWARE["rtx4060-seed002"]
    assert seed.flops("fp16") == 15.39e12 and seed.bandwidth == 768e9
    assert seed.ridge() == pytest.approx(20.04, abs=0.01)
    real = HARDWARE["rtx4060"]
    assert real.bandwidth == 128 / 8 * 17e9
    assert real.ridge() == pytest.approx(55.6, abs=0.1)


def test_hardware_roofs():
    h100 = get_hardware("H100")
    assert h100.flops("bf16") == h100.flops("fp16") > h100.flops("fp32")
    assert h100.flops("int4") == h100.flops("fp32")  # unknown dtype: the fp32 figure
    assert h100.attainable(1.0, "fp16") == h100.bandwidth
    assert h100.attainable(1e6, "fp16") == h100.flops("fp16")
    assert get_hardware("a100").bandwidth == 2039e9
    c = custom_hardware(100, 2)
    assert c.bandwidth == 100e9 and c.flops("bf16") == 2e12
    with pytest.raises(ValueError, match="unknown hardware"):
        get_hardware("tpu-v9")


def test_resolve_model(smollm_path):
    assert resolve_model("Llama-3-8B") is MODELS["llama-3-8b"]
    assert resolve_model(None) is MODELS["smollm2-135m"]
    from_file = resolve_model(smollm_path)
    preset = MODELS["smollm2-135m"]
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "rope_theta", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(from_file, field) == getattr(preset, field), field
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("gpt-5")


def test_probe_on_a_tiny_buffer():
    r = probe(buffer_bytes=4 << 20, matmul_size=64, repeats=2)
    for x in (r.bandwidth, r.bandwidth_sum, r.bandwidth_gemv, r.matmul_flops):
        assert math.isfinite(x) and x > 0
    assert r.bandwidth == max(r.bandwidth_sum, r.bandwidth_gemv)
    hw = r.hardware()
    assert hw.bandwidth == r.bandwidth and hw.flops("fp32") == r.matmul_flops
    assert r.to_dict()["ridge_flop_per_byte"] == pytest.approx(r.matmul_flops / r.bandwidth)
    # sanity: no CPU reads memory at more than 10 TB/s or multiplies at more than 1 PFLOP/s
    assert r.bandwidth < 1e13 and r.matmul_flops < 1e15
    assert measure_gemv_bandwidth(1 << 20, 1) > 0 and measure_matmul_flops(32, repeats=1) > 0
    with pytest.raises(ValueError):
        probe(buffer_bytes=10)
