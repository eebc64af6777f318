"""A peer in its own process: its answers come back, and its crash (an exception, a signal) is an error
the benchmark reports instead of dying with it."""

from __future__ import annotations

import os

import pytest

from loom.bench.isolated import IsolatedPeer, PeerFailed, exit_description
from tests.bench.fake_peers import CrashingLlamaCpp, EchoPeer, RaisingPeer, SigillPeer


def test_runs_come_back_from_the_peer_process():
    peer = IsolatedPeer(EchoPeer, scale=0.5)
    try:
        sample = peer.run([1, 2, 3, 4], 7)
        assert (sample.prefill_s, sample.decode_tokens_per_s) == (2.0, 7.0)
        assert peer._process.pid != os.getpid()
    finally:
        peer.close()
    assert not peer._process.is_alive()


def test_a_failure_to_build_or_a_signal_is_reported():
    with pytest.raises(PeerFailed, match="building the peer failed: RuntimeError: no llama here"):
        IsolatedPeer(RaisingPeer)
    peer = IsolatedPeer(SigillPeer)
    with pytest.raises(PeerFailed, match="killed by SIGILL"):
        peer.run([1], 2)
    with pytest.raises(PeerFailed):  # it stays failed
        peer.run([1], 2)
    assert exit_description(3) == "exited with status 3" and exit_description(-9) == "was killed by SIGKILL"


def test_bench_latency_reports_a_crashing_llamacpp_and_completes(tiny_gguf, monkeypatch):
    from loom.bench import peers
    from loom.bench.latency import run_latency

    monkeypatch.setattr(peers, "LlamaCppGenerate", CrashingLlamaCpp)
    result = run_latency(tiny_gguf, prompt_len=8, gen_len=4, repeats=2, peers=["llamacpp", "eager"],
                         weights="fp32")
    assert result["results"]["llamacpp"] == {"error": "the peer's process was killed by SIGILL"}
    for name in ("loom", "loom-eager"):
        assert result["results"][name]["decode_tokens_per_s"] > 0
        assert len(result["results"][name]["decode_tokens_per_s_runs"]) == 2
    assert result["speedup"] is None
