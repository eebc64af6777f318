"""Measured points from a `loom bench latency` result, and the roofline PNG."""

from __future__ import annotations

import pytest

from loom.analysis.measured import points_from_bench, precision_from_bench
from loom.analysis.plot import plot_roofline
from loom.analysis.presets import HARDWARE, MODELS, Precision
from loom.analysis.roofline import analyze, phase_cost


def fake_bench(path: str, prompt_len: int = 16, gen_len: int = 8, weight_bytes: float = 4.0) -> dict:
    """The fields of `loom bench latency --json` the analysis reads (traffic counted as bench does)."""
    cfg = MODELS["smollm2-135m"]
    ctx = prompt_len + gen_len / 2
    per_token = cfg.num_parameters() * weight_bytes + ctx * cfg.kv_bytes_per_token(4)
    return {"model": path, "prompt_len": prompt_len, "gen_len": gen_len,
            "results": {"loom": {"dtype": "float32", "prefill_s": 0.05, "decode_tokens_per_s": 20.0,
                                 "bytes_per_token": per_token}}}


def test_points_from_bench(smollm_path):
    bench = fake_bench(smollm_path)
    cfg = MODELS["smollm2-135m"]
    p = precision_from_bench(cfg, bench)
    assert p.weight == pytest.approx(4.0, rel=1e-4) and p.act == p.kv == 4.0
    # a model kept in 4.5 bits per weight is charged its real bytes
    assert precision_from_bench(cfg, fake_bench(smollm_path, weight_bytes=0.5625)).weight == \
        pytest.approx(0.5625, rel=1e-3)
    prefill, decode = points_from_bench(bench, cfg, p)
    flops, nbytes = phase_cost(cfg, "prefill", 16, 16, p)
    assert prefill.achieved_flops == pytest.approx(flops / 0.05)
    assert prefill.achieved_bandwidth == pytest.approx(nbytes / 0.05)
    flops, nbytes = phase_cost(cfg, "decode", 1, 20, p)
    assert decode.l == 20 and decode.seconds == pytest.approx(0.05)
    assert decode.achieved_bandwidth == pytest.approx(20 * nbytes)
    # decode bytes agree with bench latency's own traffic count to within the activations
    assert nbytes == pytest.approx(bench["results"]["loom"]["bytes_per_token"], rel=0.01)


def test_plot_writes_a_png(tmp_path, smollm_path):
    hw = HARDWARE["rtx4060"]
    p = Precision.of("fp32")
    cfg = MODELS["smollm2-135m"]
    reports = [analyze(cfg, "prefill", 64, 64, hw, p), analyze(cfg, "decode", 1, 64, hw, p)]
    measured = points_from_bench(fake_bench(smollm_path), cfg, p)
    out = plot_roofline(hw, reports, str(tmp_path / "roof.png"), measured, "fp32")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_measure_loom_times_a_real_prefill_and_decode():
    from loom.analysis.measured import measure_loom

    bench = measure_loom(None, prompt_len=8, gen_len=3, repeats=1)
    r = bench["results"]["loom"]
    assert bench["prefix_caching"] is False and r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0
    prefill, decode = points_from_bench(bench)
    assert prefill.n == 8 and decode.l == 10
    assert prefill.achieved_flops > 0 and decode.achieved_bandwidth > 0
