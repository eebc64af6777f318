"""The communication model of tensor and data parallelism: ring all-reduce's bytes against a step-by-step
simulation of the ring, the decode step's time against the formula written out, DP's bytes per step, the
alpha-beta fit against known lines, and a real gloo measurement on 2 processes."""

from __future__ import annotations

import numpy as np
import pytest

from loom.analysis.collectives import fit_link, measure_allreduce
from loom.analysis.parallel import allreduce_time, dp_step, gather_time, ring_allreduce_bytes, tp_decode, tp_table
from loom.analysis.presets import LINKS, MODELS, Link, Precision, get_hardware, get_link
from loom.analysis.roofline import analyze


def simulate_ring_allreduce(values: list[np.ndarray]) -> tuple[list[np.ndarray], list[int], int]:
    """A ring all-reduce done step by step (reduce-scatter, then all-gather): each rank's result, the
    bytes each rank sent, and the number of steps."""
    n = len(values)
    chunks = [np.array_split(v.copy(), n) for v in values]
    sent, steps = [0] * n, 0
    for s in range(n - 1):  # reduce-scatter: rank r sends chunk (r - s) to r + 1, which adds it
        msgs = [(r, (r - s) % n, chunks[r][(r - s) % n].copy()) for r in range(n)]
        for r, c, data in msgs:
            chunks[(r + 1) % n][c] += data
            sent[r] += data.nbytes
        steps += 1
    for s in range(n - 1):  # all-gather: rank r sends its finished chunk (r + 1 - s) to r + 1
        msgs = [(r, (r + 1 - s) % n, chunks[r][(r + 1 - s) % n].copy()) for r in range(n)]
        for r, c, data in msgs:
            chunks[(r + 1) % n][c] = data
            sent[r] += data.nbytes
        steps += 1
    return [np.concatenate(c) for c in chunks], sent, steps


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_allreduce_bytes_and_steps_are_the_simulated_rings(n):
    rng = np.random.default_rng(n)
    values = [rng.standard_normal(4096 * n).astype(np.float32) for _ in range(n)]
    results, sent, steps = simulate_ring_allreduce(values)
    for r in results:
        np.testing.assert_allclose(r, sum(values), rtol=1e-5, atol=1e-5)
    nbytes = values[0].nbytes
    assert sent == [ring_allreduce_bytes(nbytes, n)] * n
    link = Link("test", 1e9, 1e-5)
    assert allreduce_time(nbytes, n, link) == pytest.approx(steps * 1e-5 + sent[0] / 1e9)
    assert gather_time(nbytes, n, link) == pytest.approx(allreduce_time(nbytes, n, link) / 2)
    assert allreduce_time(nbytes, 1, link) == 0.0
    with pytest.raises(ValueError, match="at least 1"):
        allreduce_time(nbytes, 0, link)


def test_tp_decode_is_the_roofline_split_plus_two_allreduces_per_layer():
    cfg, hw, prec, link = MODELS["llama-2-7b"], get_hardware("a100"), Precision.of("fp16"), LINKS["nvlink"]
    one = analyze(cfg, "decode", 1, 1024, hw, prec).time_s
    for n in (1, 2, 4, 8):
        r = tp_decode(cfg, n, link, hw, prec, tokens=1, context=1024)
        assert r.allreduces == 64 and r.allreduce_bytes == 4096 * 2  # [1, 4096] fp16
        assert r.moved_bytes_per_rank == 2 * (n - 1) / n * 8192
        expected = one / n + (64 * (2 * (n - 1) * 2e-6 + 2 * (n - 1) / n * 8192 / 300e9) if n > 1 else 0)
        assert r.step_s == pytest.approx(expected)
        assert r.speedup == pytest.approx(one / expected)
    # without latency the 8 KiB messages cost little on NVLink: nearly linear
    free = tp_decode(cfg, 8, Link("ideal", 300e9, 0.0), hw, prec)
    assert free.speedup > 7.9
    # decode's messages are small: latency decides; on PCIe TP stops paying beyond 4 devices
    pcie = {r.ranks: r.per_token_s for r in tp_table(cfg, [1, 2, 4, 8], [LINKS["pcie"]], hw, prec)}
    assert pcie[8] > pcie[4] < pcie[2] < pcie[1]
    batched = tp_decode(cfg, 2, link, hw, prec, tokens=32)
    assert batched.allreduce_bytes == 32 * 8192


def test_dp_step_bytes_ddp_and_fsdp():
    cfg, hw, prec, link = MODELS["llama-2-7b"], get_hardware("a100"), Precision.of("bf16"), LINKS["nvlink"]
    p = cfg.num_parameters()
    for n in (2, 4, 8):
        ddp = dp_step(cfg, n, link, hw, prec, "ddp", 1, 2048)
        fsdp = dp_step(cfg, n, link, hw, prec, "fsdp", 1, 2048)
        assert ddp.moved_bytes_per_rank == pytest.approx(2 * (n - 1) / n * 2 * p)
        assert fsdp.moved_bytes_per_rank == pytest.approx(1.5 * ddp.moved_bytes_per_rank)  # ZeRO-3's 1.5x
        assert ddp.compute_s == pytest.approx(3 * analyze(cfg, "prefill", 2048, 2048, hw, prec).time_s)
        assert ddp.comm_s > ring_allreduce_bytes(2 * p, n) / link.bandwidth
    lora = dp_step(cfg, 2, link, hw, prec, "ddp", 1, 2048, trainable=4e6)
    assert lora.moved_bytes_per_rank == pytest.approx(4e6 * 2)
    with pytest.raises(ValueError, match="ddp or fsdp"):
        dp_step(cfg, 2, link, hw, prec, "zero")


def test_fit_link_recovers_alpha_and_beta():
    for n in (2, 4):
        truth = Link("truth", 2.5e9, 30e-6)
        sizes = [256, 4096, 65536, 1 << 20]
        fitted = fit_link(sizes, [allreduce_time(m, n, truth) for m in sizes], n)
        assert fitted.bandwidth == pytest.approx(2.5e9) and fitted.latency == pytest.approx(30e-6)
    with pytest.raises(ValueError, match="two or more"):
        fit_link([256], [1e-4], 2)
    with pytest.raises(ValueError, match="too noisy"):
        fit_link([256, 4096], [2e-4, 1e-4], 2)
    with pytest.raises(ValueError, match="unknown link"):
        get_link("infiniband-9000")


def test_measure_allreduce_on_this_machine():
    m = measure_allreduce(sizes=(256, 4 << 20), repeats=5, step_allreduces=4, step_bytes=2304, step_repeats=3)
    assert m.ranks == 2 and len(m.seconds) == 2 and all(t > 0 for t in m.seconds)
    assert all(best <= med for best, med in zip(m.seconds, m.median_seconds))
    assert m.seconds[1] > m.seconds[0]  # 4 MiB takes longer than 256 B, even on a busy machine
    link = m.fit()
    assert link.bandwidth > 0 and link.latency >= 0
    assert m.step_seconds > 0 and m.predicted_step_seconds() == pytest.approx(4 * allreduce_time(2304, 2, link))


def test_train_link_calibrates_alpha_on_the_back_to_back_train():
    """alpha from a train of a step's all-reduces: the link then predicts that train's time exactly (best or
    median), with the size fit's beta."""
    from loom.analysis.collectives import AllReduceMeasurement

    truth = Link("truth", 2.5e9, 30e-6)
    sizes = [256, 4096, 65536, 1 << 20]
    seconds = [allreduce_time(m, 2, truth) for m in sizes]
    m = AllReduceMeasurement(2, sizes, seconds, [2 * t for t in seconds], 60, 2304, 60 * 500e-6, 60 * 900e-6, 5)
    for median, train in ((False, 60 * 500e-6), (True, 60 * 900e-6)):
        link = m.train_link(median=median)
        assert link.bandwidth == pytest.approx(2.5e9)
        assert 60 * allreduce_time(2304, 2, link) == pytest.approx(train)
        assert link.latency > truth.latency
