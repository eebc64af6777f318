"""Peers for the isolation tests, importable by name (the spawned peer process imports them)."""

from __future__ import annotations

import os
import resource
import signal

from loom.analysis.runs import LatencySample


def _die_by_sigill() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
    os.kill(os.getpid(), signal.SIGILL)


class EchoPeer:
    """Answers at once: prefill seconds = prompt length x scale, decode tokens/s = gen_len."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def run(self, prompt_ids: list[int], gen_len: int) -> LatencySample:
        return LatencySample(len(prompt_ids) * self.scale, float(gen_len))


class RaisingPeer:
    def __init__(self) -> None:
        raise RuntimeError("no llama here")


class SigillPeer:
    """Killed by SIGILL in its first run, as llama.cpp's decode was."""

    def run(self, prompt_ids: list[int], gen_len: int) -> LatencySample:
        _die_by_sigill()
        raise AssertionError("unreachable")


class CrashingLlamaCpp:
    """Stands in for LlamaCppGenerate: its first run (bench latency's warm-up) works, the next dies by SIGILL."""

    def __init__(self, gguf_path: str, threads: int) -> None:
        assert os.path.exists(gguf_path) and threads >= 1
        self.runs = 0

    def run(self, prompt_ids: list[int], gen_len: int) -> LatencySample:
        self.runs += 1
        if self.runs > 1:
            _die_by_sigill()
        return LatencySample(0.01, 100.0)
